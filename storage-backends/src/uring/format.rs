//! The on-disk format of the `uring` backend, as pure encode/decode functions.
//!
//! A store directory holds a manifest (`STORE`), and per namespace and shard a data
//! file of fixed-size slots (`<namespace>/shard-<n>.blocks`, read and written with
//! O_DIRECT) and a header file (`<namespace>/shard-<n>.headers`) with one record
//! per slot. A record names the block in its slot: key, generation, layout and one
//! crc32c per layer, and carries a crc32c of itself. A slot whose record is absent,
//! torn or fails its checksum is free: that is how a crash mid-put leaves no block.

use block_layout::{BlockKey, Geometry, Layout};

const HEADER_MAGIC: u32 = 0x4450_4B42; // "DPKB"
const HEADER_VERSION: u16 = 1;
const HEADER_FIXED_BYTES: usize = 48;
/// Records are whole sectors so that a torn sector never damages a neighbour.
pub const RECORD_ALIGN_BYTES: usize = 512;

pub const MANIFEST_FILE: &str = "STORE";
pub const MANIFEST_MAGIC: &str = "dualpath-store 1";

/// Bytes of one header record for a namespace with `layers` layers.
pub fn record_bytes(layers: u16) -> usize {
    (HEADER_FIXED_BYTES + 4 * usize::from(layers) + 4).div_ceil(RECORD_ALIGN_BYTES)
        * RECORD_ALIGN_BYTES
}

/// A decoded header record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockHeader {
    pub key: BlockKey,
    pub generation: u64,
    pub namespace_hash: u32,
    pub layout: Layout,
    pub layer_bytes: u32,
    pub layer_crcs: Vec<u32>,
}

/// What a record slot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Never written or invalidated (all zero magic).
    Empty,
    Valid(BlockHeader),
    /// Present but unusable: torn, corrupt or from another format; the reason says which.
    Invalid(&'static str),
}

pub fn namespace_hash(name: &str) -> u32 {
    crc32c::crc32c(name.as_bytes())
}

/// Encodes `header` into `out` (exactly `record_bytes(layers)` long).
pub fn encode_record(header: &BlockHeader, out: &mut [u8]) {
    let layers = header.layer_crcs.len();
    let layers_u16 =
        u16::try_from(layers).expect("layer count validated by the namespace geometry");
    assert_eq!(out.len(), record_bytes(layers_u16), "record buffer size");
    out.fill(0);
    out[0..4].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
    out[4..6].copy_from_slice(&HEADER_VERSION.to_le_bytes());
    out[6] = header.layout.code();
    out[8..10].copy_from_slice(&layers_u16.to_le_bytes());
    out[12..16].copy_from_slice(&header.layer_bytes.to_le_bytes());
    out[16..32].copy_from_slice(&header.key.to_le_bytes());
    out[32..40].copy_from_slice(&header.generation.to_le_bytes());
    out[40..44].copy_from_slice(&header.namespace_hash.to_le_bytes());
    let crc_end = HEADER_FIXED_BYTES + 4 * layers;
    for (chunk, crc) in out[HEADER_FIXED_BYTES..crc_end]
        .chunks_exact_mut(4)
        .zip(&header.layer_crcs)
    {
        chunk.copy_from_slice(&crc.to_le_bytes());
    }
    let record_crc = crc32c::crc32c(&out[..crc_end]);
    out[crc_end..crc_end + 4].copy_from_slice(&record_crc.to_le_bytes());
}

/// Decodes one record. Never panics, whatever the bytes.
pub fn decode_record(bytes: &[u8]) -> Record {
    if bytes.len() < HEADER_FIXED_BYTES + 4 {
        return Record::Invalid("record shorter than its fixed part");
    }
    let magic = read_u32(bytes, 0);
    if magic == 0 {
        return Record::Empty;
    }
    if magic != HEADER_MAGIC {
        return Record::Invalid("bad magic");
    }
    if read_u16(bytes, 4) != HEADER_VERSION {
        return Record::Invalid("unknown header version");
    }
    let Some(layout) = Layout::from_code(bytes[6]) else {
        return Record::Invalid("unknown layout code");
    };
    let layers = usize::from(read_u16(bytes, 8));
    let crc_end = HEADER_FIXED_BYTES + 4 * layers;
    if layers == 0 || crc_end + 4 > bytes.len() {
        return Record::Invalid("layer count does not fit the record");
    }
    if crc32c::crc32c(&bytes[..crc_end]) != read_u32(bytes, crc_end) {
        return Record::Invalid("record checksum mismatch (torn write)");
    }
    let mut key = [0u8; 16];
    key.copy_from_slice(&bytes[16..32]);
    Record::Valid(BlockHeader {
        key: BlockKey::from_le_bytes(key),
        generation: read_u64(bytes, 32),
        namespace_hash: read_u32(bytes, 40),
        layout,
        layer_bytes: read_u32(bytes, 12),
        layer_crcs: bytes[HEADER_FIXED_BYTES..crc_end]
            .chunks_exact(4)
            .map(|chunk| u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
            .collect(),
    })
}

const USE_ORDER_MAGIC: u32 = 0x4450_5553; // "DPUS"
const USE_ORDER_VERSION: u16 = 1;
const USE_ORDER_FIXED_BYTES: usize = 24;
const USE_ORDER_ENTRY_BYTES: usize = 12;

/// A namespace shard's use order as saved when a gateway stops
/// (`<namespace>/shard-<n>.use-order`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UseOrder {
    /// The shard's next generation when it was saved: every block stored
    /// after has this one or a later one (a shard that opens with the file
    /// never numbers below it, so no generation in it is used again).
    pub next_generation: u64,
    /// Live blocks from least to most recently used, each as its slot and
    /// the generation of the block in it, so that a block since replaced or
    /// removed is recognised and skipped.
    pub entries: Vec<(u32, u64)>,
}

/// Encodes a use order. A hint, not a record: a file that is missing, torn
/// or stale costs only the order, never a block. Layout: magic, version
/// (u16), reserved (u16), next generation (u64), entry count (u64), entries
/// (slot u32, generation u64), crc32c of all before it; little-endian.
pub fn encode_use_order(order: &UseOrder) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(USE_ORDER_FIXED_BYTES + order.entries.len() * USE_ORDER_ENTRY_BYTES + 4);
    out.extend_from_slice(&USE_ORDER_MAGIC.to_le_bytes());
    out.extend_from_slice(&USE_ORDER_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&order.next_generation.to_le_bytes());
    out.extend_from_slice(&(order.entries.len() as u64).to_le_bytes());
    for (slot, generation) in &order.entries {
        out.extend_from_slice(&slot.to_le_bytes());
        out.extend_from_slice(&generation.to_le_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes [`encode_use_order`]'s bytes; the reason when they are not
/// whole. Never panics, whatever the bytes.
pub fn decode_use_order(bytes: &[u8]) -> Result<UseOrder, &'static str> {
    if bytes.len() < USE_ORDER_FIXED_BYTES + 4 {
        return Err("shorter than its fixed part");
    }
    if read_u32(bytes, 0) != USE_ORDER_MAGIC {
        return Err("bad magic");
    }
    if read_u16(bytes, 4) != USE_ORDER_VERSION {
        return Err("unknown version");
    }
    let count = read_u64(bytes, 16);
    let body = bytes.len() - USE_ORDER_FIXED_BYTES - 4;
    if !body.is_multiple_of(USE_ORDER_ENTRY_BYTES) || (body / USE_ORDER_ENTRY_BYTES) as u64 != count
    {
        return Err("entry count does not match the length (torn write)");
    }
    let crc_at = bytes.len() - 4;
    if crc32c::crc32c(&bytes[..crc_at]) != read_u32(bytes, crc_at) {
        return Err("checksum mismatch (torn write)");
    }
    Ok(UseOrder {
        next_generation: read_u64(bytes, 8),
        entries: bytes[USE_ORDER_FIXED_BYTES..crc_at]
            .chunks_exact(USE_ORDER_ENTRY_BYTES)
            .map(|entry| (read_u32(entry, 0), read_u64(entry, 4)))
            .collect(),
    })
}

fn read_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// One namespace as recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestNamespace {
    pub name: String,
    pub geometry: Geometry,
    pub slots_per_shard: u32,
}

/// The store's manifest: shard count and namespace geometry, fixed once blocks exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub shards: u32,
    pub namespaces: Vec<ManifestNamespace>,
}

impl Manifest {
    pub fn encode(&self) -> String {
        let mut text = format!("{MANIFEST_MAGIC}\nshards {}\n", self.shards);
        for namespace in &self.namespaces {
            let geometry = namespace.geometry;
            text.push_str(&format!(
                "namespace {} layers={} tokens_per_block={} bytes_per_token_per_layer={} layout={} slots_per_shard={}\n",
                namespace.name,
                geometry.layers,
                geometry.tokens_per_block,
                geometry.bytes_per_token_per_layer,
                geometry.layout,
                namespace.slots_per_shard
            ));
        }
        text
    }

    pub fn decode(text: &str) -> Result<Self, String> {
        let mut lines = text.lines();
        if lines.next() != Some(MANIFEST_MAGIC) {
            return Err(format!("first line is not {MANIFEST_MAGIC:?}"));
        }
        let shards = lines
            .next()
            .and_then(|line| line.strip_prefix("shards "))
            .and_then(|count| count.parse().ok())
            .ok_or("second line is not `shards N`")?;
        let namespaces = lines
            .filter(|line| !line.trim().is_empty())
            .map(decode_namespace_line)
            .collect::<Result<_, _>>()?;
        Ok(Self { shards, namespaces })
    }
}

fn decode_namespace_line(line: &str) -> Result<ManifestNamespace, String> {
    let mut words = line.split_whitespace();
    if words.next() != Some("namespace") {
        return Err(format!("unexpected line {line:?}"));
    }
    let name = words
        .next()
        .ok_or_else(|| format!("namespace line without a name: {line:?}"))?;
    let mut field = |expected: &str| -> Result<&str, String> {
        words
            .next()
            .and_then(|word| word.strip_prefix(expected)?.strip_prefix('='))
            .ok_or_else(|| format!("namespace {name}: missing {expected}"))
    };
    let number_error = |what: &str| format!("namespace {name}: bad {what}");
    let layers = field("layers")?
        .parse()
        .map_err(|_| number_error("layers"))?;
    let tokens_per_block = field("tokens_per_block")?
        .parse()
        .map_err(|_| number_error("tokens_per_block"))?;
    let bytes_per_token_per_layer = field("bytes_per_token_per_layer")?
        .parse()
        .map_err(|_| number_error("bytes_per_token_per_layer"))?;
    let layout = match field("layout")? {
        "full" => Layout::Full,
        "layer" => Layout::Layer,
        _ => return Err(number_error("layout")),
    };
    let slots_per_shard = field("slots_per_shard")?
        .parse()
        .map_err(|_| number_error("slots_per_shard"))?;
    Ok(ManifestNamespace {
        name: name.to_owned(),
        geometry: Geometry {
            layers,
            tokens_per_block,
            bytes_per_token_per_layer,
            layout,
        },
        slots_per_shard,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn use_orders_round_trip_and_any_damage_is_refused(
            entries in prop::collection::vec((any::<u32>(), any::<u64>()), 0..100),
            next_generation in any::<u64>(),
            position in any::<prop::sample::Index>(),
            flip in 1u8..=255,
            cut in any::<prop::sample::Index>(),
        ) {
            let order = UseOrder { next_generation, entries };
            let bytes = encode_use_order(&order);
            prop_assert_eq!(decode_use_order(&bytes), Ok(order));
            let mut flipped = bytes.clone();
            flipped[position.index(bytes.len())] ^= flip;
            prop_assert!(decode_use_order(&flipped).is_err());
            prop_assert!(decode_use_order(&bytes[..cut.index(bytes.len())]).is_err());
        }

        #[test]
        fn records_round_trip(
            key in any::<u128>(),
            generation in any::<u64>(),
            crcs in prop::collection::vec(any::<u32>(), 1..200),
            layered in any::<bool>(),
        ) {
            let header = BlockHeader {
                key: BlockKey(key),
                generation,
                namespace_hash: 7,
                layout: if layered { Layout::Layer } else { Layout::Full },
                layer_bytes: 4096,
                layer_crcs: crcs,
            };
            let layers = u16::try_from(header.layer_crcs.len()).expect("below 200");
            let mut bytes = vec![0u8; record_bytes(layers)];
            encode_record(&header, &mut bytes);
            prop_assert_eq!(decode_record(&bytes), Record::Valid(header));
        }

        #[test]
        fn any_single_flipped_byte_invalidates_a_record(position in 0usize..300, flip in 1u8..=255) {
            let header = BlockHeader {
                key: BlockKey(42),
                generation: 9,
                namespace_hash: 1,
                layout: Layout::Full,
                layer_bytes: 100,
                layer_crcs: vec![1; 61],
            };
            let mut bytes = vec![0u8; record_bytes(61)];
            encode_record(&header, &mut bytes);
            let used = HEADER_FIXED_BYTES + 4 * 61 + 4;
            let position = position % used;
            bytes[position] ^= flip;
            prop_assert!(!matches!(decode_record(&bytes), Record::Valid(_)));
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
            let _ = decode_record(&bytes);
        }
    }

    #[test]
    fn zeroed_record_is_empty() {
        assert_eq!(decode_record(&[0u8; 512]), Record::Empty);
    }

    #[test]
    fn manifest_round_trips() {
        let manifest = Manifest {
            shards: 2,
            namespaces: vec![ManifestNamespace {
                name: "m".into(),
                geometry: Geometry {
                    layers: 61,
                    tokens_per_block: 64,
                    bytes_per_token_per_layer: 656,
                    layout: Layout::Layer,
                },
                slots_per_shard: 100,
            }],
        };
        assert_eq!(Manifest::decode(&manifest.encode()), Ok(manifest));
        assert!(Manifest::decode("garbage").is_err());
    }
}
