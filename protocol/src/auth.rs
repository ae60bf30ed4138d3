//! Shared-secret challenge-response for the hello exchange. The secret never
//! crosses the wire: the client proves it knows it with an HMAC-SHA256 over both
//! sides' fresh nonces and the shard it asked for, so a recorded proof is useless
//! for any other connection.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of each side's nonce.
pub const NONCE_BYTES: usize = 32;
const CONTEXT: &[u8] = b"dualpath-hello-v1";

fn mac(secret: &[u8], client_nonce: &[u8], server_nonce: &[u8], shard: u32) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(CONTEXT);
    for part in [client_nonce, server_nonce] {
        mac.update(&u16::try_from(part.len()).unwrap_or(u16::MAX).to_le_bytes());
        mac.update(part);
    }
    mac.update(&shard.to_le_bytes());
    mac
}

/// The client's proof of the secret for one hello exchange.
pub fn proof(secret: &[u8], client_nonce: &[u8], server_nonce: &[u8], shard: u32) -> Vec<u8> {
    mac(secret, client_nonce, server_nonce, shard).finalize().into_bytes().to_vec()
}

/// Checks a proof in constant time.
pub fn verify(secret: &[u8], client_nonce: &[u8], server_nonce: &[u8], shard: u32, proof: &[u8]) -> bool {
    mac(secret, client_nonce, server_nonce, shard).verify_slice(proof).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proof_verifies_only_with_the_same_secret_nonces_and_shard() {
        let (client, server) = ([1u8; NONCE_BYTES], [2u8; NONCE_BYTES]);
        let good = proof(b"secret", &client, &server, 3);
        assert!(verify(b"secret", &client, &server, 3, &good));
        assert!(!verify(b"other", &client, &server, 3, &good));
        assert!(!verify(b"secret", &server, &client, 3, &good));
        assert!(!verify(b"secret", &client, &server, 4, &good));
        assert!(!verify(b"secret", &client, &server, 3, &good[..31]));
    }
}
