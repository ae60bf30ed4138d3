//! The unsafe boundary of the storage backends: submission of I/O on io_uring.
pub mod uring;
