//! A deterministic synthetic KV set: keys and block contents derived from a seed,
//! so that any process can check what another wrote without keeping a copy.

use block_layout::BlockKey;

/// The `index`-th key of the synthetic set `seed`.
pub fn key(seed: u64, index: u64) -> BlockKey {
    let high = splitmix(seed ^ 0x5eed_0000_0000_0000);
    let low = splitmix(index.wrapping_add(high));
    BlockKey((u128::from(high) << 64) | u128::from(low))
}

/// Fills `out` with the contents of block `key` (any length).
// Folding the key's two halves drops bits on purpose.
#[allow(clippy::cast_possible_truncation)]
pub fn fill(key: BlockKey, out: &mut [u8]) {
    let mut state = (key.0 as u64) ^ ((key.0 >> 64) as u64);
    for chunk in out.chunks_mut(8) {
        state = splitmix(state);
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

fn splitmix(mut value: u64) -> u64 {
    value = value.wrapping_add(0x9E37_79B9_7F4A_7C15);
    value = (value ^ (value >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    value ^ (value >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_distinct_and_contents_reproducible() {
        let keys: std::collections::HashSet<_> = (0..10_000).map(|index| key(3, index)).collect();
        assert_eq!(keys.len(), 10_000);
        let (mut first, mut second) = (vec![0u8; 1001], vec![0u8; 1001]);
        fill(key(3, 5), &mut first);
        fill(key(3, 5), &mut second);
        assert_eq!(first, second);
        fill(key(3, 6), &mut second);
        assert_ne!(first, second);
    }
}
