//! The unsafe boundary of the storage backends: submission of I/O on io_uring,
//! and the worker threads of the fallback engine.
pub mod threads;
pub mod uring;
