//! The on-disk block header record decoder on arbitrary bytes (what a torn or
//! corrupted header file holds): never panics; a valid record round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use storage_backends::uring::format::{decode_record, encode_record, record_bytes, Record};

fuzz_target!(|bytes: &[u8]| {
    if let Record::Valid(header) = decode_record(bytes) {
        let layers = u16::try_from(header.layer_crcs.len()).expect("a decoded record has few layers");
        let mut again = vec![0u8; record_bytes(layers)];
        encode_record(&header, &mut again);
        assert_eq!(decode_record(&again), Record::Valid(header));
    }
});
