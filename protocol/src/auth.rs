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
    mac(secret, client_nonce, server_nonce, shard)
        .finalize()
        .into_bytes()
        .to_vec()
}

/// Checks a proof in constant time.
pub fn verify(
    secret: &[u8],
    client_nonce: &[u8],
    server_nonce: &[u8],
    shard: u32,
    proof: &[u8],
) -> bool {
    mac(secret, client_nonce, server_nonce, shard)
        .verify_slice(proof)
        .is_ok()
}

const SIGNATURE_CONTEXT: &[u8] = b"dualpath-gossip-v1";
/// Bytes of a signature appended by [`sign`].
pub const SIGNATURE_BYTES: usize = 32;

/// Appends an HMAC-SHA256 of `message` under `secret` (gateway-to-gateway gossip).
pub fn sign(secret: &[u8], message: &mut Vec<u8>) {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(SIGNATURE_CONTEXT);
    mac.update(message);
    message.extend_from_slice(&mac.finalize().into_bytes());
}

/// Checks and strips the signature `sign` appended; `None` if it does not verify.
pub fn verify_signed<'a>(secret: &[u8], signed: &'a [u8]) -> Option<&'a [u8]> {
    let split = signed.len().checked_sub(SIGNATURE_BYTES)?;
    let (message, signature) = signed.split_at(split);
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(SIGNATURE_CONTEXT);
    mac.update(message);
    mac.verify_slice(signature).ok().map(|()| message)
}

#[cfg(test)]
mod tests {
    #[test]
    fn signed_messages_verify_only_with_the_secret_and_unchanged() {
        let mut message = b"report".to_vec();
        super::sign(b"secret", &mut message);
        assert_eq!(
            super::verify_signed(b"secret", &message),
            Some(&b"report"[..])
        );
        assert_eq!(super::verify_signed(b"other", &message), None);
        message[0] ^= 1;
        assert_eq!(super::verify_signed(b"secret", &message), None);
        assert_eq!(super::verify_signed(b"secret", b"short"), None);
    }

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
