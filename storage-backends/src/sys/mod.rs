//! The unsafe boundary of the storage backends: submission of I/O on io_uring,
//! the worker threads of the fallback engine, and reserving files' space.
pub mod fs;
pub mod threads;
pub mod uring;
