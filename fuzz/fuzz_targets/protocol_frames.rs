//! Every decoder of the wire protocol on arbitrary bytes: no panic, no hang, no
//! allocation sized by an unchecked length (run with -malloc_limit_mb).
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::{decode_data_prefix, decode_header, decode_store, decode_store_prefix, Frame, FrameType, DATA_PREFIX_BYTES, HEADER_BYTES};

fuzz_target!(|bytes: &[u8]| {
    if bytes.len() >= HEADER_BYTES {
        let header: [u8; HEADER_BYTES] = bytes[..HEADER_BYTES].try_into().expect("length checked");
        if let Ok(header) = decode_header(&header) {
            let body = &bytes[HEADER_BYTES..];
            match header.kind {
                FrameType::Data => {
                    if body.len() >= DATA_PREFIX_BYTES {
                        let prefix: [u8; DATA_PREFIX_BYTES] = body[..DATA_PREFIX_BYTES].try_into().expect("length checked");
                        let _ = decode_data_prefix(header.body_len, &prefix);
                    }
                }
                FrameType::Store => {
                    let _ = decode_store(body);
                    // A prefix decoded from the first bytes is the whole body's.
                    if let (Ok(Some((early, _))), Ok((whole, _))) =
                        (decode_store_prefix(body, header.body_len), decode_store(body))
                    {
                        if body.len() == header.body_len as usize {
                            assert_eq!(early, whole);
                        }
                    }
                }
                kind => {
                    if let Ok(frame) = Frame::decode(kind, body) {
                        // What decodes re-encodes to something that decodes the same.
                        let again = frame.encode();
                        assert_eq!(Frame::decode(kind, &again[HEADER_BYTES..]).as_ref(), Ok(&frame));
                    }
                }
            }
        }
    }
    if let Some(&first) = bytes.first() {
        if let Some(kind) = FrameType::from_code(first) {
            let _ = Frame::decode(kind, &bytes[1..]);
        }
    }
});
