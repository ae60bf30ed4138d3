//! The saved use order's decoder on arbitrary bytes (what a torn, truncated or
//! foreign `shard-<n>.use-order` holds): never panics, never allocates by an
//! unchecked count; a decoded order round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use storage_backends::uring::format::{decode_use_order, encode_use_order};

fuzz_target!(|bytes: &[u8]| {
    if let Ok(order) = decode_use_order(bytes) {
        assert_eq!(encode_use_order(&order), bytes);
    }
});
