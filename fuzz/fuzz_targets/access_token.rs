//! The access-token parsers on arbitrary input: a grant arrives in the hello
//! before the client has proved anything, so its decoder must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::auth::{parse_token, AccessGrant};

fuzz_target!(|bytes: &[u8]| {
    if let Ok(grant) = AccessGrant::decode(bytes) {
        // What decodes re-encodes to a grant that decodes the same, when valid.
        if let Ok(encoded) = grant.encode() {
            assert_eq!(AccessGrant::decode(&encoded).as_ref(), Ok(&grant));
        }
    }
    if let Ok(text) = std::str::from_utf8(bytes) {
        let _ = parse_token(text);
    }
});
