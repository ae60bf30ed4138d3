//! Block keys from a prompt's tokens: a prefix chain, so that two prompts
//! sharing their first `n` blocks of tokens share their first `n` keys, and a
//! block's key names every token before it too (a block's KV depends on all of
//! them). Engines compute these keys and look the chain up before a load; the
//! construction is specified in `docs/engine-integration.md` ("Block keys"),
//! with test vectors, so that an engine in another language computes the same
//! keys.
//!
//! `root = SHA-256("dualpath-prefix-v1" ‖ le64(len(salt)) ‖ salt)`, and for each
//! whole block of `t` tokens `key = SHA-256(parent ‖ le32(t) ‖ le32(token)…)`,
//! where `parent` is the previous block's key (the root for the first) as 16
//! little-endian bytes; a key is the digest's first 16 bytes read as a
//! little-endian `u128`. 128 bits keep an accidental collision (which would
//! serve one prompt another's KV) out of reach at any cache size; SHA-256
//! keeps a deliberate one out of reach of a tenant who chooses its tokens.

use sha2::{Digest, Sha256};

use crate::BlockKey;

/// Names this construction; a later one takes another, so keys of the two
/// never meet.
const DOMAIN: &[u8] = b"dualpath-prefix-v1";

/// Tokens encoded per hash update: the block's tokens are fed in pieces of
/// this many from a buffer on the stack, not one update a token.
const TOKENS_PER_UPDATE: usize = 64;

/// The chain's start: the parent of a prompt's first block. `salt` holds
/// whatever else the KV depends on besides the tokens (a LoRA adapter, the
/// hash of an image in the prompt, a model revision); empty for none.
pub fn prefix_root(salt: &[u8]) -> BlockKey {
    let mut hasher = Sha256::new();
    hasher.update(DOMAIN);
    hasher.update((salt.len() as u64).to_le_bytes());
    hasher.update(salt);
    key_of(hasher)
}

/// The keys of the whole blocks of `tokens` (`tokens_per_block` each; a last,
/// partial block has none, as it cannot be stored), the first one chained to
/// `parent`: [`prefix_root`] for a prompt's tokens from its start, or the key
/// of the block just before `tokens` when they continue a chain that ended on
/// a block boundary.
///
/// # Panics
/// If `tokens_per_block` is 0.
pub fn prefix_keys(parent: BlockKey, tokens: &[u32], tokens_per_block: u32) -> Vec<BlockKey> {
    assert!(tokens_per_block > 0, "tokens_per_block must be positive");
    let per_block = tokens_per_block as usize;
    let mut keys = Vec::with_capacity(tokens.len() / per_block);
    let mut parent = parent;
    let mut encoded = [0u8; TOKENS_PER_UPDATE * 4];
    for block in tokens.chunks_exact(per_block) {
        let mut hasher = Sha256::new();
        hasher.update(parent.to_le_bytes());
        hasher.update(tokens_per_block.to_le_bytes());
        for piece in block.chunks(TOKENS_PER_UPDATE) {
            for (bytes, token) in encoded.chunks_exact_mut(4).zip(piece) {
                bytes.copy_from_slice(&token.to_le_bytes());
            }
            hasher.update(&encoded[..piece.len() * 4]);
        }
        parent = key_of(hasher);
        keys.push(parent);
    }
    keys
}

fn key_of(hasher: Sha256) -> BlockKey {
    let digest = hasher.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    BlockKey::from_le_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(hex: &str) -> BlockKey {
        hex.parse().expect("a test vector is a valid key")
    }

    /// The test vectors of `docs/engine-integration.md`, computed there with
    /// Python's `hashlib` from the construction as written (an implementation
    /// independent of this one).
    #[test]
    fn keys_match_the_documented_test_vectors() {
        assert_eq!(prefix_root(b""), key("6920433e7cf92b24f6f6846f314113c2"));
        assert_eq!(
            prefix_root(b"lora-7"),
            key("9fd7244252b010f8ec87167869aad3c0")
        );
        let tokens: Vec<u32> = (0..8).collect();
        assert_eq!(
            prefix_keys(prefix_root(b""), &tokens, 4),
            [
                key("3f955d79db9a5af9f795c7a2b890ee98"),
                key("5b9226bda8cd5eba0737eaa64001648d")
            ]
        );
        assert_eq!(
            prefix_keys(prefix_root(b"lora-7"), &tokens, 4),
            [
                key("d546a0e36f09d84ee1414c1ee301e036"),
                key("abbfd8fe93e6714e041bb67c69751c09")
            ]
        );
    }

    #[test]
    fn a_partial_last_block_has_no_key() {
        let root = prefix_root(b"");
        let tokens: Vec<u32> = (0..11).collect();
        assert_eq!(
            prefix_keys(root, &tokens, 4),
            prefix_keys(root, &tokens[..8], 4)
        );
        assert!(prefix_keys(root, &tokens[..3], 4).is_empty());
    }

    #[test]
    #[should_panic(expected = "tokens_per_block must be positive")]
    fn zero_tokens_a_block_is_refused() {
        let _ = prefix_keys(prefix_root(b""), &[1, 2, 3], 0);
    }

    proptest! {
        /// A prompt that extends another shares its keys; a chain continued
        /// from its last key gives the keys of the whole.
        #[test]
        fn an_extended_prompt_shares_the_keys_of_its_prefix(
            tokens in proptest::collection::vec(any::<u32>(), 0..600),
            per_block in 1u32..80,
            cut in 0usize..600,
        ) {
            let root = prefix_root(b"");
            let whole = prefix_keys(root, &tokens, per_block);
            let per = per_block as usize;
            prop_assert_eq!(whole.len(), tokens.len() / per);
            let blocks = cut.min(tokens.len()) / per;
            let head = prefix_keys(root, &tokens[..blocks * per], per_block);
            prop_assert_eq!(&head[..], &whole[..blocks]);
            let parent = head.last().copied().unwrap_or(root);
            let tail = prefix_keys(parent, &tokens[blocks * per..], per_block);
            prop_assert_eq!(&tail[..], &whole[blocks..]);
        }

        /// A changed token changes its block's key and every later one, and
        /// no earlier one; another salt or block size changes them all.
        #[test]
        fn a_key_names_every_token_before_it(
            tokens in proptest::collection::vec(any::<u32>(), 1..400),
            per_block in 1u32..40,
            at in any::<prop::sample::Index>(),
            change in 1u32..,
        ) {
            let root = prefix_root(b"");
            let whole = prefix_keys(root, &tokens, per_block);
            let at = at.index(tokens.len());
            let mut changed = tokens.clone();
            changed[at] = changed[at].wrapping_add(change);
            let other = prefix_keys(root, &changed, per_block);
            let block = at / per_block as usize;
            for (index, (a, b)) in whole.iter().zip(&other).enumerate() {
                prop_assert_eq!(a == b, index < block);
            }
            let salted = prefix_keys(prefix_root(b"adapter"), &tokens, per_block);
            prop_assert!(whole.iter().zip(&salted).all(|(a, b)| a != b));
        }
    }
}
