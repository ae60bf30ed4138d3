//! The wire protocol between the client (in the prefill engine) and a gateway
//! shard: versioned, length-prefixed binary frames, little-endian.
//!
//! Pure encode/decode, no I/O, so that every input can be property-tested: decoding
//! never panics, every length and offset is bounds-checked, and no allocation is
//! sized by an unchecked length. `docs/PROTOCOL.md` is the specification.
#![forbid(unsafe_code)]

use std::fmt;
use std::ops::Range;

use block_layout::{BlockKey, Geometry, Layout};

pub mod auth;

/// The version this build speaks. A gateway also accepts clients of every
/// version from [`OLDEST_PROTOCOL_VERSION`] on and speaks theirs.
/// 2 added `ForgetRegion`; 3 added `Lookup`; 4 added `Remove`.
pub const PROTOCOL_VERSION: u16 = 4;
/// The oldest version a gateway of this build still serves.
pub const OLDEST_PROTOCOL_VERSION: u16 = 1;
/// The first version in which a gateway takes `ForgetRegion`.
pub const FORGET_REGION_VERSION: u16 = 2;
/// The first version in which a gateway takes `Lookup`.
pub const LOOKUP_VERSION: u16 = 3;
/// The first version in which a gateway takes `Remove`.
pub const REMOVE_VERSION: u16 = 4;
/// Most keys in one `Lookup` or `Remove`.
pub const LOOKUP_KEYS_MAX: u32 = 16_384;
pub const FRAME_MAGIC: u16 = 0xD1A7;
/// Bytes of every frame's header: magic u16, type u8, flags u8, body length u32.
pub const HEADER_BYTES: usize = 8;
/// Bytes of a `Data` body before its payload.
pub const DATA_PREFIX_BYTES: usize = 24;
/// Largest body of a control frame (everything but `Data` and `Store`).
pub const CONTROL_BODY_MAX: u32 = 1 << 20;
/// Largest payload of one `Data` or `Store` frame.
pub const PAYLOAD_MAX: u32 = 256 << 20;
/// Most blocks in one `Load`.
pub const LOAD_BLOCKS_MAX: u32 = 16_384;
/// Longest string (namespace, message, auth token).
pub const STRING_MAX: usize = 1024;
/// Most namespaces announced in `HelloOk`.
pub const NAMESPACES_MAX: usize = 1024;

const STORE_PREFIX_BYTES: usize = 8 + 2 + 16;
/// The most a `Store` frame's body holds around a payload of `payload_bytes`
/// (request id, the longest namespace, key, payload).
pub fn store_body_max(payload_bytes: u64) -> u64 {
    (STORE_PREFIX_BYTES + STRING_MAX) as u64 + payload_bytes
}
/// Bytes of one block entry of a `Load`: key, layer start, layer end, offset.
const LOAD_BLOCK_BYTES: usize = 16 + 2 + 2 + 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    Hello = 1,
    HelloOk = 2,
    RegisterRegion = 3,
    RegionRegistered = 4,
    Load = 5,
    Data = 6,
    LayerDone = 7,
    BlockDone = 8,
    LoadDone = 9,
    Store = 10,
    StoreDone = 11,
    Error = 12,
    Challenge = 13,
    Proof = 14,
    StatusRequest = 15,
    PoolStatus = 16,
    RdmaConnect = 17,
    RdmaAccept = 18,
    RegisterRemoteRegion = 19,
    CancelLoad = 20,
    StoreFromRegion = 21,
    ForgetRegion = 22,
    Lookup = 23,
    LookupResult = 24,
    Remove = 25,
    RemoveResult = 26,
}

impl FrameType {
    pub fn from_code(code: u8) -> Option<Self> {
        use FrameType::*;
        [
            Hello,
            HelloOk,
            RegisterRegion,
            RegionRegistered,
            Load,
            Data,
            LayerDone,
            BlockDone,
            LoadDone,
            Store,
            StoreDone,
            Error,
            Challenge,
            Proof,
            StatusRequest,
            PoolStatus,
            RdmaConnect,
            RdmaAccept,
            RegisterRemoteRegion,
            CancelLoad,
            StoreFromRegion,
            ForgetRegion,
            Lookup,
            LookupResult,
            Remove,
            RemoveResult,
        ]
        .into_iter()
        .find(|kind| *kind as u8 == code)
    }
}

/// Status codes of `BlockDone`, `StoreDone` and `Error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    Ok = 0,
    NotFound = 1,
    Corrupt = 2,
    BadRequest = 3,
    OutOfRegion = 4,
    UnknownNamespace = 5,
    Busy = 6,
    Io = 7,
    ShuttingDown = 8,
    UnsupportedVersion = 9,
    BadFrame = 10,
    Unauthorized = 11,
    Internal = 12,
    /// The client cancelled the load before the block was read.
    Cancelled = 13,
}

impl ErrorCode {
    pub fn from_code(code: u16) -> Self {
        use ErrorCode::*;
        [
            Ok,
            NotFound,
            Corrupt,
            BadRequest,
            OutOfRegion,
            UnknownNamespace,
            Busy,
            Io,
            ShuttingDown,
            UnsupportedVersion,
            BadFrame,
            Unauthorized,
            Cancelled,
        ]
        .into_iter()
        .find(|kind| *kind as u16 == code)
        .unwrap_or(Internal)
    }

    /// Whether the same request may succeed later or through another path.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Busy | ErrorCode::Io | ErrorCode::ShuttingDown
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("bad frame magic {0:#06x}: the peer does not speak the dualpath protocol")]
    Magic(u16),
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("{kind:?} frame body of {len} bytes exceeds the limit of {max}")]
    TooLong { kind: FrameType, len: u32, max: u32 },
    #[error("{kind:?} frame body truncated: needed {needed} bytes, have {have}")]
    Truncated {
        kind: FrameType,
        needed: usize,
        have: usize,
    },
    #[error("{kind:?} frame has {extra} unexpected trailing bytes")]
    Trailing { kind: FrameType, extra: usize },
    #[error("invalid {field} in {kind:?} frame: {problem}")]
    Invalid {
        kind: FrameType,
        field: &'static str,
        problem: String,
    },
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: FrameType,
    pub body_len: u32,
}

/// Decodes and bounds-checks a header.
pub fn decode_header(bytes: &[u8; HEADER_BYTES]) -> Result<Header, ProtocolError> {
    let magic = u16::from_le_bytes([bytes[0], bytes[1]]);
    if magic != FRAME_MAGIC {
        return Err(ProtocolError::Magic(magic));
    }
    let kind = FrameType::from_code(bytes[2]).ok_or(ProtocolError::UnknownType(bytes[2]))?;
    let body_len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    let max = match kind {
        FrameType::Data => DATA_PREFIX_BYTES as u32 + PAYLOAD_MAX,
        FrameType::Store => STORE_PREFIX_BYTES as u32 + STRING_MAX as u32 + PAYLOAD_MAX,
        _ => CONTROL_BODY_MAX,
    };
    if body_len > max {
        return Err(ProtocolError::TooLong {
            kind,
            len: body_len,
            max,
        });
    }
    Ok(Header { kind, body_len })
}

pub fn encode_header(kind: FrameType, body_len: u32) -> [u8; HEADER_BYTES] {
    let mut header = [0u8; HEADER_BYTES];
    header[0..2].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
    header[2] = kind as u8;
    header[4..8].copy_from_slice(&body_len.to_le_bytes());
    header
}

/// A namespace as the gateway announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub name: String,
    pub geometry: Geometry,
}

/// One block of a `Load`: its key, the layers wanted, and where layer `layers.start`
/// goes in the region (layer `l` goes to `dest_offset + (l - layers.start) * layer_stride`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockLoad {
    pub key: BlockKey,
    pub layers: Range<u16>,
    pub dest_offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Load {
    pub request_id: u64,
    pub namespace: String,
    pub region_id: u32,
    /// Distance between consecutive layers of one block in the region; 0 means the
    /// layer size (each block's layers back to back).
    pub layer_stride: u64,
    pub blocks: Vec<BlockLoad>,
}

/// The fixed part of a `Data` frame; `len` payload bytes follow it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataPrefix {
    pub request_id: u64,
    pub region_id: u32,
    pub offset: u64,
    pub len: u32,
}

/// Every frame but `Data` and the payload of `Store`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello {
        version: u16,
        shard: u32,
        token: Vec<u8>,
    },
    HelloOk {
        version: u16,
        shard: u32,
        shard_count: u32,
        namespaces: Vec<NamespaceInfo>,
    },
    RegisterRegion {
        region_id: u32,
        len: u64,
    },
    RegionRegistered {
        region_id: u32,
    },
    Load(Load),
    LayerDone {
        request_id: u64,
        layer: u16,
    },
    BlockDone {
        request_id: u64,
        block_index: u32,
        code: ErrorCode,
        message: String,
    },
    LoadDone {
        request_id: u64,
        blocks_ok: u32,
        blocks_failed: u32,
    },
    StoreDone {
        request_id: u64,
        code: ErrorCode,
        message: String,
    },
    Error {
        request_id: u64,
        code: ErrorCode,
        message: String,
    },
    /// The gateway's nonce, when it requires authentication.
    Challenge {
        nonce: Vec<u8>,
    },
    /// The client's answer: `auth::proof` over both nonces.
    Proof {
        mac: Vec<u8>,
    },
    /// Asks a gateway for its view of the decode pool.
    StatusRequest,
    /// The gateway's view of the decode pool: itself and the peers it hears from.
    PoolStatus {
        peers: Vec<PeerStatus>,
    },
    /// The client asks for RDMA on this connection: its queue pair's endpoint.
    RdmaConnect(RdmaEndpoint),
    /// The gateway's queue pair for this connection; from here on the gateway
    /// writes payloads with RDMA WRITE and sends every frame over the queue
    /// pair. `store_reads`: the gateway takes `StoreFromRegion` on it (its
    /// store lends registered staging for the block to be read into).
    RdmaAccept {
        endpoint: RdmaEndpoint,
        store_reads: bool,
    },
    /// A region the client registered for remote writes: where it is and its key.
    RegisterRemoteRegion {
        region_id: u32,
        len: u64,
        address: u64,
        rkey: u32,
    },
    /// The client no longer wants load `request_id`: the gateway reads none
    /// of its blocks that it has not begun (they end `Cancelled`), and ends
    /// the load with `LoadDone` as usual once the reads in flight have been
    /// written: after that frame nothing more of the load arrives.
    CancelLoad {
        request_id: u64,
    },
    /// The client has withdrawn region `region_id` (protocol version 2 on):
    /// the gateway forgets it, and a later `Load` or `StoreFromRegion` naming
    /// it is refused (`OutOfRegion`). Sent only when no load or store on the
    /// connection uses the region; a gateway that still has one closes the
    /// connection (`BadFrame`), which ends every write as well.
    ForgetRegion {
        region_id: u32,
    },
    /// Which of `keys` the gateway's store holds in `namespace` (protocol
    /// version 3 on): an engine asks before it plans a load (how much of a
    /// prompt's prefix is stored, and so need not be computed). Answered by
    /// `LookupResult`. Each shard answers for the keys it owns.
    Lookup(KeyBatch),
    /// The answer to `Lookup` `request_id`: `bits[i]` says whether key `i`
    /// is stored.
    LookupResult(KeyBits),
    /// Remove `keys` from the gateway's store in `namespace` (protocol
    /// version 4 on; the token must be allowed to write the namespace): an engine or an
    /// operator withdrawing blocks (a conversation deleted, a cache
    /// invalidated). Answered by `RemoveResult` once the removal is durable.
    /// Each shard removes the keys it owns.
    Remove(KeyBatch),
    /// The answer to `Remove` `request_id`: `bits[i]` says whether key `i`
    /// was stored (and is removed now).
    RemoveResult(KeyBits),
    /// Store one whole block that lies in a region the client announced with
    /// `RegisterRemoteRegion`: the gateway reads it with RDMA READ (layer `l`
    /// at `offset + l * layer_stride`; `layer_stride` 0: the layer size) and
    /// answers `StoreDone` as for `Store`. Only on RDMA connections whose
    /// `RdmaAccept` said `store_reads`.
    StoreFromRegion(StoreFromRegion),
}

/// Keys of one namespace asked about together: the body of `Lookup` and
/// `Remove`, at most [`LOOKUP_KEYS_MAX`] keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyBatch {
    pub request_id: u64,
    pub namespace: String,
    pub keys: Vec<BlockKey>,
}

/// The answer to a [`KeyBatch`], one bit a key (a bitmap on the wire,
/// lowest bit first): the body of `LookupResult` and `RemoveResult`. With a
/// code other than `Ok` the request was refused (`message` says why) and
/// `bits` is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyBits {
    pub request_id: u64,
    pub code: ErrorCode,
    pub message: String,
    pub bits: Vec<bool>,
}

impl KeyBits {
    /// A refusal of request `request_id`.
    pub fn refused(request_id: u64, code: ErrorCode, message: String) -> Self {
        Self {
            request_id,
            code,
            message,
            bits: Vec::new(),
        }
    }
}

/// Where the block of a `StoreFromRegion` lies in the client's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreFromRegion {
    pub request_id: u64,
    pub namespace: String,
    pub key: BlockKey,
    pub region_id: u32,
    pub offset: u64,
    pub layer_stride: u64,
}

/// `RdmaAccept`'s flag bit: the gateway takes `StoreFromRegion`.
const RDMA_ACCEPT_STORE_READS: u8 = 1;

/// A reliable-connected queue pair's address, as exchanged on the control
/// connection (RoCE v2: the GID carries the IP address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RdmaEndpoint {
    pub qp_num: u32,
    pub psn: u32,
    pub lid: u16,
    pub gid: [u8; 16],
}

/// One gateway's load as the pool sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// The gateway's client address (`gateway.listen_tcp`), its identity.
    pub address: String,
    /// Bytes of loads accepted and not yet delivered.
    pub queued_bytes: u64,
    /// Storage bytes read per second, recently.
    pub read_bytes_per_second: u64,
    /// Milliseconds since the last report from it (0 for the gateway itself).
    pub age_ms: u32,
}

/// Most peers in one `PoolStatus`.
pub const PEERS_MAX: usize = 4096;

/// The fixed part of a `Store` frame; `payload_len` block bytes follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorePrefix {
    pub request_id: u64,
    pub namespace: String,
    pub key: BlockKey,
    pub payload_len: u32,
}

struct Reader<'a> {
    kind: FrameType,
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], ProtocolError> {
        let end = self
            .at
            .checked_add(len)
            .filter(|&end| end <= self.bytes.len())
            .ok_or(ProtocolError::Truncated {
                kind: self.kind,
                needed: self.at.saturating_add(len),
                have: self.bytes.len(),
            })?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let mut array = [0u8; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn u128(&mut self) -> Result<u128, ProtocolError> {
        Ok(u128::from_le_bytes(self.array()?))
    }

    fn bytes_u16(&mut self, field: &'static str) -> Result<&'a [u8], ProtocolError> {
        let len = usize::from(self.u16()?);
        if len > STRING_MAX {
            return Err(self.invalid(field, format!("{len} bytes, the most is {STRING_MAX}")));
        }
        self.take(len)
    }

    fn string(&mut self, field: &'static str) -> Result<String, ProtocolError> {
        self.str(field).map(str::to_owned)
    }

    fn str(&mut self, field: &'static str) -> Result<&'a str, ProtocolError> {
        let bytes = self.bytes_u16(field)?;
        std::str::from_utf8(bytes).map_err(|_| self.invalid(field, "not UTF-8".into()))
    }

    fn invalid(&self, field: &'static str, problem: String) -> ProtocolError {
        ProtocolError::Invalid {
            kind: self.kind,
            field,
            problem,
        }
    }

    fn finish(&self) -> Result<(), ProtocolError> {
        match self.bytes.len() - self.at {
            0 => Ok(()),
            extra => Err(ProtocolError::Trailing {
                kind: self.kind,
                extra,
            }),
        }
    }
}

#[derive(Default)]
struct Writer {
    bytes: Vec<u8>,
}

impl Writer {
    fn u8(&mut self, value: u8) -> &mut Self {
        self.bytes.push(value);
        self
    }
    fn u16(&mut self, value: u16) -> &mut Self {
        self.bytes.extend_from_slice(&value.to_le_bytes());
        self
    }
    fn u32(&mut self, value: u32) -> &mut Self {
        self.bytes.extend_from_slice(&value.to_le_bytes());
        self
    }
    fn u64(&mut self, value: u64) -> &mut Self {
        self.bytes.extend_from_slice(&value.to_le_bytes());
        self
    }
    fn u128(&mut self, value: u128) -> &mut Self {
        self.bytes.extend_from_slice(&value.to_le_bytes());
        self
    }
    /// Strings longer than the limit are cut (at a character boundary): messages
    /// are for humans, and a frame must stay decodable.
    fn string(&mut self, value: &str) -> &mut Self {
        let mut end = value.len().min(STRING_MAX);
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        self.bytes_u16(&value.as_bytes()[..end])
    }
    fn bytes_u16(&mut self, value: &[u8]) -> &mut Self {
        let len = value.len().min(STRING_MAX);
        self.u16(u16::try_from(len).expect("at most STRING_MAX"));
        self.bytes.extend_from_slice(&value[..len]);
        self
    }
}

impl Frame {
    pub fn kind(&self) -> FrameType {
        match self {
            Frame::Hello { .. } => FrameType::Hello,
            Frame::HelloOk { .. } => FrameType::HelloOk,
            Frame::RegisterRegion { .. } => FrameType::RegisterRegion,
            Frame::RegionRegistered { .. } => FrameType::RegionRegistered,
            Frame::Load(_) => FrameType::Load,
            Frame::LayerDone { .. } => FrameType::LayerDone,
            Frame::BlockDone { .. } => FrameType::BlockDone,
            Frame::LoadDone { .. } => FrameType::LoadDone,
            Frame::StoreDone { .. } => FrameType::StoreDone,
            Frame::Error { .. } => FrameType::Error,
            Frame::Challenge { .. } => FrameType::Challenge,
            Frame::Proof { .. } => FrameType::Proof,
            Frame::StatusRequest => FrameType::StatusRequest,
            Frame::PoolStatus { .. } => FrameType::PoolStatus,
            Frame::RdmaConnect(_) => FrameType::RdmaConnect,
            Frame::RdmaAccept { .. } => FrameType::RdmaAccept,
            Frame::RegisterRemoteRegion { .. } => FrameType::RegisterRemoteRegion,
            Frame::CancelLoad { .. } => FrameType::CancelLoad,
            Frame::ForgetRegion { .. } => FrameType::ForgetRegion,
            Frame::Lookup(_) => FrameType::Lookup,
            Frame::LookupResult(_) => FrameType::LookupResult,
            Frame::Remove(_) => FrameType::Remove,
            Frame::RemoveResult(_) => FrameType::RemoveResult,
            Frame::StoreFromRegion(_) => FrameType::StoreFromRegion,
        }
    }

    /// Appends the whole frame (header and body) to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        encode_framed(self.kind(), 0, out, |body| self.encode_body(body));
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    fn encode_body(&self, out: &mut Writer) {
        match self {
            Frame::Hello {
                version,
                shard,
                token,
            } => {
                out.u16(*version).u32(*shard).bytes_u16(token);
            }
            Frame::HelloOk {
                version,
                shard,
                shard_count,
                namespaces,
            } => {
                out.u16(*version).u32(*shard).u32(*shard_count);
                out.u16(u16::try_from(namespaces.len().min(NAMESPACES_MAX)).expect("bounded"));
                for namespace in namespaces.iter().take(NAMESPACES_MAX) {
                    let geometry = namespace.geometry;
                    out.string(&namespace.name)
                        .u16(geometry.layers)
                        .u32(geometry.tokens_per_block)
                        .u32(geometry.bytes_per_token_per_layer)
                        .u8(geometry.layout.code());
                }
            }
            Frame::RegisterRegion { region_id, len } => {
                out.u32(*region_id).u64(*len);
            }
            Frame::RegionRegistered { region_id } => {
                out.u32(*region_id);
            }
            Frame::RdmaConnect(endpoint) => encode_endpoint(out, endpoint),
            Frame::RdmaAccept {
                endpoint,
                store_reads,
            } => {
                encode_endpoint(out, endpoint);
                out.u8(if *store_reads {
                    RDMA_ACCEPT_STORE_READS
                } else {
                    0
                });
            }
            Frame::StoreFromRegion(store) => StoreFromRegionRef {
                request_id: store.request_id,
                namespace: &store.namespace,
                key: store.key,
                region_id: store.region_id,
                offset: store.offset,
                layer_stride: store.layer_stride,
            }
            .encode_body(out),
            Frame::RegisterRemoteRegion {
                region_id,
                len,
                address,
                rkey,
            } => {
                out.u32(*region_id).u64(*len).u64(*address).u32(*rkey);
            }
            Frame::Load(load) => {
                out.u64(load.request_id)
                    .string(&load.namespace)
                    .u32(load.region_id)
                    .u64(load.layer_stride);
                out.u32(u32::try_from(load.blocks.len()).expect("callers bound blocks per load"));
                for block in &load.blocks {
                    out.u128(block.key.0)
                        .u16(block.layers.start)
                        .u16(block.layers.end)
                        .u64(block.dest_offset);
                }
            }
            Frame::LayerDone { request_id, layer } => {
                out.u64(*request_id).u16(*layer);
            }
            Frame::BlockDone {
                request_id,
                block_index,
                code,
                message,
            } => {
                out.u64(*request_id)
                    .u32(*block_index)
                    .u16(*code as u16)
                    .string(message);
            }
            Frame::LoadDone {
                request_id,
                blocks_ok,
                blocks_failed,
            } => {
                out.u64(*request_id).u32(*blocks_ok).u32(*blocks_failed);
            }
            Frame::StoreDone {
                request_id,
                code,
                message,
            }
            | Frame::Error {
                request_id,
                code,
                message,
            } => {
                out.u64(*request_id).u16(*code as u16).string(message);
            }
            Frame::Challenge { nonce } => {
                out.bytes_u16(nonce);
            }
            Frame::Proof { mac } => {
                out.bytes_u16(mac);
            }
            Frame::StatusRequest => {}
            Frame::CancelLoad { request_id } => {
                out.u64(*request_id);
            }
            Frame::ForgetRegion { region_id } => {
                out.u32(*region_id);
            }
            Frame::Lookup(batch) | Frame::Remove(batch) => {
                out.u64(batch.request_id).string(&batch.namespace);
                out.u32(u32::try_from(batch.keys.len()).expect("callers bound keys per batch"));
                for key in &batch.keys {
                    out.u128(key.0);
                }
            }
            Frame::LookupResult(answer) | Frame::RemoveResult(answer) => {
                out.u64(answer.request_id)
                    .u16(answer.code as u16)
                    .string(&answer.message);
                out.u32(u32::try_from(answer.bits.len()).expect("as many as the batch's keys"));
                for byte in answer.bits.chunks(8) {
                    out.u8(byte
                        .iter()
                        .enumerate()
                        .fold(0, |bits, (bit, &set)| bits | (u8::from(set) << bit)));
                }
            }
            Frame::PoolStatus { peers } => {
                out.u32(u32::try_from(peers.len().min(PEERS_MAX)).expect("bounded"));
                for peer in peers.iter().take(PEERS_MAX) {
                    out.string(&peer.address)
                        .u64(peer.queued_bytes)
                        .u64(peer.read_bytes_per_second)
                        .u32(peer.age_ms);
                }
            }
        }
    }

    /// Decodes the body of a control frame of type `kind`.
    pub fn decode(kind: FrameType, body: &[u8]) -> Result<Self, ProtocolError> {
        let mut reader = Reader {
            kind,
            bytes: body,
            at: 0,
        };
        let frame = match kind {
            FrameType::Hello => Frame::Hello {
                version: reader.u16()?,
                shard: reader.u32()?,
                token: reader.bytes_u16("token")?.to_vec(),
            },
            FrameType::HelloOk => decode_hello_ok(&mut reader)?,
            FrameType::RegisterRegion => Frame::RegisterRegion {
                region_id: reader.u32()?,
                len: reader.u64()?,
            },
            FrameType::RegionRegistered => Frame::RegionRegistered {
                region_id: reader.u32()?,
            },
            FrameType::RdmaConnect => Frame::RdmaConnect(decode_endpoint(&mut reader)?),
            FrameType::RdmaAccept => Frame::RdmaAccept {
                endpoint: decode_endpoint(&mut reader)?,
                store_reads: reader.u8()? & RDMA_ACCEPT_STORE_READS != 0,
            },
            FrameType::StoreFromRegion => {
                Frame::StoreFromRegion(decode_store_from_region_fields(&mut reader)?.to_owned())
            }
            FrameType::RegisterRemoteRegion => Frame::RegisterRemoteRegion {
                region_id: reader.u32()?,
                len: reader.u64()?,
                address: reader.u64()?,
                rkey: reader.u32()?,
            },
            FrameType::Load => Frame::Load(decode_load(&mut reader)?),
            FrameType::LayerDone => Frame::LayerDone {
                request_id: reader.u64()?,
                layer: reader.u16()?,
            },
            FrameType::BlockDone => Frame::BlockDone {
                request_id: reader.u64()?,
                block_index: reader.u32()?,
                code: ErrorCode::from_code(reader.u16()?),
                message: reader.string("message")?,
            },
            FrameType::LoadDone => Frame::LoadDone {
                request_id: reader.u64()?,
                blocks_ok: reader.u32()?,
                blocks_failed: reader.u32()?,
            },
            FrameType::StoreDone => Frame::StoreDone {
                request_id: reader.u64()?,
                code: ErrorCode::from_code(reader.u16()?),
                message: reader.string("message")?,
            },
            FrameType::Error => Frame::Error {
                request_id: reader.u64()?,
                code: ErrorCode::from_code(reader.u16()?),
                message: reader.string("message")?,
            },
            FrameType::Challenge => Frame::Challenge {
                nonce: reader.bytes_u16("nonce")?.to_vec(),
            },
            FrameType::Proof => Frame::Proof {
                mac: reader.bytes_u16("mac")?.to_vec(),
            },
            FrameType::StatusRequest => Frame::StatusRequest,
            FrameType::CancelLoad => Frame::CancelLoad {
                request_id: reader.u64()?,
            },
            FrameType::ForgetRegion => Frame::ForgetRegion {
                region_id: reader.u32()?,
            },
            FrameType::Lookup => Frame::Lookup(decode_key_batch(&mut reader)?),
            FrameType::LookupResult => Frame::LookupResult(decode_key_bits(&mut reader)?),
            FrameType::Remove => Frame::Remove(decode_key_batch(&mut reader)?),
            FrameType::RemoveResult => Frame::RemoveResult(decode_key_bits(&mut reader)?),
            FrameType::PoolStatus => decode_pool_status(&mut reader)?,
            FrameType::Data | FrameType::Store => {
                return Err(ProtocolError::Invalid {
                    kind,
                    field: "type",
                    problem: "not a control frame".into(),
                })
            }
        };
        reader.finish()?;
        Ok(frame)
    }
}

fn decode_hello_ok(reader: &mut Reader<'_>) -> Result<Frame, ProtocolError> {
    let version = reader.u16()?;
    let shard = reader.u32()?;
    let shard_count = reader.u32()?;
    let count = usize::from(reader.u16()?);
    if count > NAMESPACES_MAX {
        return Err(reader.invalid(
            "namespaces",
            format!("{count}, the most is {NAMESPACES_MAX}"),
        ));
    }
    let mut namespaces = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let name = reader.string("namespace")?;
        let geometry = Geometry {
            layers: reader.u16()?,
            tokens_per_block: reader.u32()?,
            bytes_per_token_per_layer: reader.u32()?,
            layout: Layout::from_code(reader.u8()?)
                .ok_or_else(|| reader.invalid("layout", "unknown code".into()))?,
        };
        geometry
            .validate()
            .map_err(|error| reader.invalid("geometry", error.to_string()))?;
        namespaces.push(NamespaceInfo { name, geometry });
    }
    Ok(Frame::HelloOk {
        version,
        shard,
        shard_count,
        namespaces,
    })
}

fn encode_endpoint(out: &mut Writer, endpoint: &RdmaEndpoint) {
    out.u32(endpoint.qp_num)
        .u32(endpoint.psn)
        .u16(endpoint.lid)
        .bytes_u16(&endpoint.gid);
}

fn decode_endpoint(reader: &mut Reader<'_>) -> Result<RdmaEndpoint, ProtocolError> {
    let qp_num = reader.u32()?;
    let psn = reader.u32()?;
    let lid = reader.u16()?;
    let gid = reader.bytes_u16("gid")?;
    let gid: [u8; 16] = gid.try_into().map_err(|_| ProtocolError::Invalid {
        kind: reader.kind,
        field: "gid",
        problem: "must be 16 bytes".into(),
    })?;
    Ok(RdmaEndpoint {
        qp_num,
        psn,
        lid,
        gid,
    })
}

fn decode_pool_status(reader: &mut Reader<'_>) -> Result<Frame, ProtocolError> {
    let count = reader.u32()? as usize;
    if count > PEERS_MAX {
        return Err(reader.invalid("peers", format!("{count}, the most is {PEERS_MAX}")));
    }
    let mut peers = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        peers.push(PeerStatus {
            address: reader.string("address")?,
            queued_bytes: reader.u64()?,
            read_bytes_per_second: reader.u64()?,
            age_ms: reader.u32()?,
        });
    }
    Ok(Frame::PoolStatus { peers })
}

/// Checks a key count against [`LOOKUP_KEYS_MAX`] and against the bytes
/// present (`bytes_each` per key) before anything is allocated.
fn lookup_count(reader: &mut Reader<'_>, bytes_each: usize) -> Result<usize, ProtocolError> {
    let count = reader.u32()?;
    if count > LOOKUP_KEYS_MAX {
        return Err(reader.invalid("keys", format!("{count}, the most is {LOOKUP_KEYS_MAX}")));
    }
    let count = count as usize;
    let needed = (count * bytes_each).div_ceil(8);
    if reader.bytes.len() - reader.at < needed {
        return Err(ProtocolError::Truncated {
            kind: reader.kind,
            needed: reader.at + needed,
            have: reader.bytes.len(),
        });
    }
    Ok(count)
}

fn decode_key_batch(reader: &mut Reader<'_>) -> Result<KeyBatch, ProtocolError> {
    let request_id = reader.u64()?;
    let namespace = reader.string("namespace")?;
    // 128 bits a key.
    let count = lookup_count(reader, 128)?;
    let mut keys = Vec::with_capacity(count);
    for _ in 0..count {
        keys.push(BlockKey(reader.u128()?));
    }
    Ok(KeyBatch {
        request_id,
        namespace,
        keys,
    })
}

fn decode_key_bits(reader: &mut Reader<'_>) -> Result<KeyBits, ProtocolError> {
    let request_id = reader.u64()?;
    let code = ErrorCode::from_code(reader.u16()?);
    let message = reader.string("message")?;
    // One bit a key.
    let count = lookup_count(reader, 1)?;
    let bits = reader.take(count.div_ceil(8))?;
    let bits = (0..count)
        .map(|index| bits[index / 8] & (1 << (index % 8)) != 0)
        .collect();
    Ok(KeyBits {
        request_id,
        code,
        message,
        bits,
    })
}

fn decode_load(reader: &mut Reader<'_>) -> Result<Load, ProtocolError> {
    let request_id = reader.u64()?;
    let namespace = reader.string("namespace")?;
    let region_id = reader.u32()?;
    let layer_stride = reader.u64()?;
    let count = reader.u32()?;
    if count > LOAD_BLOCKS_MAX {
        return Err(reader.invalid("blocks", format!("{count}, the most is {LOAD_BLOCKS_MAX}")));
    }
    // The count is checked against the bytes present before anything is allocated.
    let needed = count as usize * LOAD_BLOCK_BYTES;
    if reader.bytes.len() - reader.at < needed {
        return Err(ProtocolError::Truncated {
            kind: FrameType::Load,
            needed: reader.at + needed,
            have: reader.bytes.len(),
        });
    }
    let mut blocks = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let key = BlockKey(reader.u128()?);
        let start = reader.u16()?;
        let end = reader.u16()?;
        if start >= end {
            return Err(reader.invalid(
                "layers",
                format!("empty range {start}..{end} for block {key}"),
            ));
        }
        blocks.push(BlockLoad {
            key,
            layers: start..end,
            dest_offset: reader.u64()?,
        });
    }
    Ok(Load {
        request_id,
        namespace,
        region_id,
        layer_stride,
        blocks,
    })
}

/// Encodes a `Data` frame's header and prefix; `prefix.len` payload bytes follow.
pub fn encode_data_head(prefix: &DataPrefix) -> [u8; HEADER_BYTES + DATA_PREFIX_BYTES] {
    let mut head = [0u8; HEADER_BYTES + DATA_PREFIX_BYTES];
    let body_len = DATA_PREFIX_BYTES as u32 + prefix.len;
    head[..HEADER_BYTES].copy_from_slice(&encode_header(FrameType::Data, body_len));
    head[8..16].copy_from_slice(&prefix.request_id.to_le_bytes());
    head[16..20].copy_from_slice(&prefix.region_id.to_le_bytes());
    head[24..32].copy_from_slice(&prefix.offset.to_le_bytes());
    head
}

/// Decodes a `Data` prefix given the frame's body length.
pub fn decode_data_prefix(
    body_len: u32,
    bytes: &[u8; DATA_PREFIX_BYTES],
) -> Result<DataPrefix, ProtocolError> {
    let len = body_len
        .checked_sub(DATA_PREFIX_BYTES as u32)
        .ok_or(ProtocolError::Truncated {
            kind: FrameType::Data,
            needed: DATA_PREFIX_BYTES,
            have: body_len as usize,
        })?;
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    Ok(DataPrefix {
        request_id: word(0),
        region_id: u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")),
        offset: word(16),
        len,
    })
}

/// Encodes a `Store` frame's header and prefix; `payload_len` bytes follow.
pub fn encode_store_head(prefix: &StorePrefix) -> Vec<u8> {
    let mut head = Vec::new();
    encode_store_head_into(
        &mut head,
        prefix.request_id,
        &prefix.namespace,
        prefix.key,
        prefix.payload_len,
    );
    head
}

/// Appends a `Store` frame's head (header and prefix; the payload follows)
/// to `out`, borrowing the namespace: the client sends one per block, from a
/// buffer it reuses.
pub fn encode_store_head_into(
    out: &mut Vec<u8>,
    request_id: u64,
    namespace: &str,
    key: BlockKey,
    payload_len: u32,
) {
    encode_framed(FrameType::Store, payload_len, out, |body| {
        body.u64(request_id).string(namespace).u128(key.0);
    });
}

/// Appends a frame of `kind` to `out`: its header, then what `body` writes,
/// then (not written here) `trailing_len` more bytes the header counts.
fn encode_framed(
    kind: FrameType,
    trailing_len: u32,
    out: &mut Vec<u8>,
    body: impl FnOnce(&mut Writer),
) {
    let mut writer = Writer {
        bytes: std::mem::take(out),
    };
    let start = writer.bytes.len();
    writer.bytes.extend_from_slice(&[0u8; HEADER_BYTES]);
    body(&mut writer);
    let body_len = u32::try_from(writer.bytes.len() - start - HEADER_BYTES)
        .expect("frame heads are small")
        + trailing_len;
    writer.bytes[start..start + HEADER_BYTES].copy_from_slice(&encode_header(kind, body_len));
    *out = writer.bytes;
}

/// A `StoreFromRegion` frame's fields, borrowed: the client sends one per
/// block and encodes it into a buffer it reuses ([`StoreFromRegionRef::encode_into`]).
#[derive(Debug, Clone, Copy)]
pub struct StoreFromRegionRef<'a> {
    pub request_id: u64,
    pub namespace: &'a str,
    pub key: BlockKey,
    pub region_id: u32,
    pub offset: u64,
    pub layer_stride: u64,
}

/// Decodes a `StoreFromRegion` body, the namespace borrowed: what the
/// gateway does for every block stored by RDMA READ, without allocating.
pub fn decode_store_from_region(body: &[u8]) -> Result<StoreFromRegionRef<'_>, ProtocolError> {
    let mut reader = Reader {
        kind: FrameType::StoreFromRegion,
        bytes: body,
        at: 0,
    };
    let store = decode_store_from_region_fields(&mut reader)?;
    reader.finish()?;
    Ok(store)
}

fn decode_store_from_region_fields<'a>(
    reader: &mut Reader<'a>,
) -> Result<StoreFromRegionRef<'a>, ProtocolError> {
    Ok(StoreFromRegionRef {
        request_id: reader.u64()?,
        namespace: reader.str("namespace")?,
        key: BlockKey(reader.u128()?),
        region_id: reader.u32()?,
        offset: reader.u64()?,
        layer_stride: reader.u64()?,
    })
}

impl StoreFromRegionRef<'_> {
    pub fn to_owned(&self) -> StoreFromRegion {
        StoreFromRegion {
            request_id: self.request_id,
            namespace: self.namespace.to_owned(),
            key: self.key,
            region_id: self.region_id,
            offset: self.offset,
            layer_stride: self.layer_stride,
        }
    }

    /// Appends the whole frame to `out`: the same bytes as
    /// `Frame::StoreFromRegion`'s encoding.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        encode_framed(FrameType::StoreFromRegion, 0, out, |body| {
            self.encode_body(body);
        });
    }

    fn encode_body(&self, out: &mut Writer) {
        out.u64(self.request_id)
            .string(self.namespace)
            .u128(self.key.0)
            .u32(self.region_id)
            .u64(self.offset)
            .u64(self.layer_stride);
    }
}

/// A `Store`'s prefix borrowing its namespace from the frame: what the
/// gateway decodes for every stored block, without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorePrefixRef<'a> {
    pub request_id: u64,
    pub namespace: &'a str,
    pub key: BlockKey,
    pub payload_len: u32,
}

impl StorePrefixRef<'_> {
    pub fn to_owned(&self) -> StorePrefix {
        StorePrefix {
            request_id: self.request_id,
            namespace: self.namespace.to_owned(),
            key: self.key,
            payload_len: self.payload_len,
        }
    }
}

/// Decodes a `Store` body (prefix and payload); returns the prefix and the payload.
pub fn decode_store(body: &[u8]) -> Result<(StorePrefix, &[u8]), ProtocolError> {
    decode_store_ref(body).map(|(prefix, payload)| (prefix.to_owned(), payload))
}

/// [`decode_store`], the namespace borrowed.
pub fn decode_store_ref(body: &[u8]) -> Result<(StorePrefixRef<'_>, &[u8]), ProtocolError> {
    let body_len = u32::try_from(body.len()).map_err(|_| ProtocolError::Invalid {
        kind: FrameType::Store,
        field: "payload",
        problem: "over 4 GiB".into(),
    })?;
    let (prefix, prefix_len) =
        decode_store_prefix_ref(body, body_len)?.expect("the whole body is here");
    Ok((prefix, &body[prefix_len..]))
}

/// Decodes a `Store`'s prefix from the first bytes of its body (`body_start`)
/// before its payload has arrived, so that the payload can be received
/// straight into the memory it is stored from. Returns the prefix and its
/// length in the body, or `None` while more bytes are needed: never more than
/// [`store_prefix_max`] bytes, or the whole body when it is shorter.
pub fn decode_store_prefix(
    body_start: &[u8],
    body_len: u32,
) -> Result<Option<(StorePrefix, usize)>, ProtocolError> {
    Ok(decode_store_prefix_ref(body_start, body_len)?
        .map(|(prefix, prefix_len)| (prefix.to_owned(), prefix_len)))
}

/// [`decode_store_prefix`], the namespace borrowed.
pub fn decode_store_prefix_ref(
    body_start: &[u8],
    body_len: u32,
) -> Result<Option<(StorePrefixRef<'_>, usize)>, ProtocolError> {
    let body_start = &body_start[..body_start.len().min(body_len as usize)];
    let enough = body_start.len() >= (body_len as usize).min(store_prefix_max());
    let mut reader = Reader {
        kind: FrameType::Store,
        bytes: body_start,
        at: 0,
    };
    let decoded = (|| {
        let request_id = reader.u64()?;
        let namespace = reader.str("namespace")?;
        let key = BlockKey(reader.u128()?);
        Ok::<_, ProtocolError>((request_id, namespace, key))
    })();
    match decoded {
        Ok((request_id, namespace, key)) => Ok(Some((
            StorePrefixRef {
                request_id,
                namespace,
                key,
                payload_len: body_len - reader.at as u32,
            },
            reader.at,
        ))),
        Err(error) if enough => Err(error),
        Err(_) => Ok(None),
    }
}

/// The most bytes a `Store` body's prefix takes (the longest namespace).
pub fn store_prefix_max() -> usize {
    STORE_PREFIX_BYTES + STRING_MAX
}

/// Checks that `offset..offset + len` lies inside a region of `region_len` bytes.
/// The one place where remote-write bounds are decided.
pub fn range_inside(offset: u64, len: u64, region_len: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= region_len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(frame: &Frame) -> Frame {
        let bytes = frame.encode();
        let header =
            decode_header(bytes[..HEADER_BYTES].try_into().expect("8 bytes")).expect("header");
        assert_eq!(header.body_len as usize, bytes.len() - HEADER_BYTES);
        Frame::decode(header.kind, &bytes[HEADER_BYTES..]).expect("body")
    }

    #[test]
    fn control_frames_round_trip() {
        let frames = [
            Frame::Hello {
                version: 1,
                shard: 3,
                token: b"secret".to_vec(),
            },
            Frame::HelloOk {
                version: 1,
                shard: 1,
                shard_count: 2,
                namespaces: vec![NamespaceInfo {
                    name: "m".into(),
                    geometry: Geometry {
                        layers: 61,
                        tokens_per_block: 64,
                        bytes_per_token_per_layer: 656,
                        layout: Layout::Layer,
                    },
                }],
            },
            Frame::RegisterRegion {
                region_id: 9,
                len: 1 << 40,
            },
            Frame::RegionRegistered { region_id: 9 },
            Frame::RdmaConnect(RdmaEndpoint {
                qp_num: 17,
                psn: 0x00AB_CDEF,
                lid: 0,
                gid: [7; 16],
            }),
            Frame::RdmaAccept {
                endpoint: RdmaEndpoint {
                    qp_num: 18,
                    psn: 1,
                    lid: 3,
                    gid: [1; 16],
                },
                store_reads: true,
            },
            Frame::RdmaAccept {
                endpoint: RdmaEndpoint {
                    qp_num: 19,
                    psn: 2,
                    lid: 0,
                    gid: [2; 16],
                },
                store_reads: false,
            },
            Frame::StoreFromRegion(StoreFromRegion {
                request_id: 79,
                namespace: "m".into(),
                key: BlockKey(u128::MAX - 3),
                region_id: 4,
                offset: 3 << 33,
                layer_stride: 1 << 20,
            }),
            Frame::RegisterRemoteRegion {
                region_id: 4,
                len: 1 << 30,
                address: 0x7f00_0000_0000,
                rkey: 0x1234,
            },
            Frame::Load(Load {
                request_id: 77,
                namespace: "m".into(),
                region_id: 9,
                layer_stride: 0,
                blocks: vec![BlockLoad {
                    key: BlockKey(5),
                    layers: 0..61,
                    dest_offset: 4096,
                }],
            }),
            Frame::LayerDone {
                request_id: 77,
                layer: 60,
            },
            Frame::BlockDone {
                request_id: 77,
                block_index: 0,
                code: ErrorCode::NotFound,
                message: "gone".into(),
            },
            Frame::LoadDone {
                request_id: 77,
                blocks_ok: 1,
                blocks_failed: 0,
            },
            Frame::StoreDone {
                request_id: 78,
                code: ErrorCode::Ok,
                message: String::new(),
            },
            Frame::Error {
                request_id: 0,
                code: ErrorCode::BadFrame,
                message: "bad".into(),
            },
            Frame::Challenge { nonce: vec![1; 32] },
            Frame::Proof { mac: vec![2; 32] },
            Frame::StatusRequest,
            Frame::CancelLoad { request_id: 77 },
            Frame::ForgetRegion { region_id: 9 },
            Frame::Lookup(KeyBatch {
                request_id: 79,
                namespace: "kv".into(),
                keys: vec![BlockKey(1), BlockKey(u128::MAX)],
            }),
            Frame::LookupResult(KeyBits::refused(79, ErrorCode::Unauthorized, "no".into())),
            Frame::Remove(KeyBatch {
                request_id: 80,
                namespace: "kv".into(),
                keys: vec![BlockKey(2)],
            }),
            Frame::RemoveResult(KeyBits {
                request_id: 80,
                code: ErrorCode::Ok,
                message: String::new(),
                bits: vec![true],
            }),
            Frame::PoolStatus {
                peers: vec![PeerStatus {
                    address: "10.0.0.1:7400".into(),
                    queued_bytes: 5,
                    read_bytes_per_second: 6,
                    age_ms: 7,
                }],
            },
        ];
        for frame in frames {
            assert_eq!(round_trip(&frame), frame);
        }
    }

    #[test]
    fn data_and_store_heads_round_trip() {
        let prefix = DataPrefix {
            request_id: 1,
            region_id: 2,
            offset: 3 << 33,
            len: 4096,
        };
        let head = encode_data_head(&prefix);
        let header = decode_header(head[..8].try_into().expect("8")).expect("header");
        assert_eq!(header.kind, FrameType::Data);
        assert_eq!(
            decode_data_prefix(header.body_len, head[8..].try_into().expect("24")),
            Ok(prefix)
        );
        let store = StorePrefix {
            request_id: 5,
            namespace: "ns".into(),
            key: BlockKey(6),
            payload_len: 3,
        };
        let mut frame = encode_store_head(&store);
        frame.extend_from_slice(b"abc");
        let header = decode_header(frame[..8].try_into().expect("8")).expect("header");
        let (decoded, payload) =
            decode_store(&frame[8..8 + header.body_len as usize]).expect("store");
        assert_eq!((decoded, payload), (store, &b"abc"[..]));
    }

    #[test]
    fn oversized_and_foreign_headers_are_refused() {
        assert!(matches!(
            decode_header(&encode_header(FrameType::Load, CONTROL_BODY_MAX + 1)),
            Err(ProtocolError::TooLong { .. })
        ));
        assert!(matches!(
            decode_header(b"GET / HT"),
            Err(ProtocolError::Magic(_))
        ));
        let mut unknown = encode_header(FrameType::Load, 0);
        unknown[2] = 99;
        assert_eq!(decode_header(&unknown), Err(ProtocolError::UnknownType(99)));
    }

    #[test]
    fn load_with_a_huge_block_count_is_refused_before_allocating() {
        let mut body = Writer::default();
        body.u64(1).string("m").u32(0).u64(0).u32(LOAD_BLOCKS_MAX);
        assert!(matches!(
            Frame::decode(FrameType::Load, &body.bytes),
            Err(ProtocolError::Truncated { .. })
        ));
    }

    #[test]
    fn key_batches_with_a_huge_key_count_are_refused_before_allocating() {
        for (batch, answer) in [
            (FrameType::Lookup, FrameType::LookupResult),
            (FrameType::Remove, FrameType::RemoveResult),
        ] {
            let mut body = Writer::default();
            body.u64(1).string("m").u32(LOOKUP_KEYS_MAX);
            assert!(matches!(
                Frame::decode(batch, &body.bytes),
                Err(ProtocolError::Truncated { .. })
            ));
            let mut body = Writer::default();
            body.u64(1).string("m").u32(LOOKUP_KEYS_MAX + 1);
            assert!(matches!(
                Frame::decode(batch, &body.bytes),
                Err(ProtocolError::Invalid { field: "keys", .. })
            ));
            let mut body = Writer::default();
            body.u64(1).u16(0).string("").u32(17).u8(0xFF).u8(0xFF);
            assert!(matches!(
                Frame::decode(answer, &body.bytes),
                Err(ProtocolError::Truncated { .. })
            ));
        }
    }

    #[test]
    fn range_inside_handles_overflow() {
        assert!(range_inside(0, 10, 10));
        assert!(!range_inside(1, 10, 10));
        assert!(!range_inside(u64::MAX, 2, u64::MAX));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(kind in any::<u8>(), body in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Some(kind) = FrameType::from_code(kind) {
                let _ = Frame::decode(kind, &body);
            }
            let _ = decode_store(&body);
            let _ = decode_store_from_region(&body);
            if body.len() >= 8 {
                let _ = decode_header(body[..8].try_into().expect("8"));
            }
        }

        #[test]
        fn a_store_prefix_decodes_from_its_first_bytes_once_they_are_all_there(
            request_id in any::<u64>(),
            namespace in "[a-z]{0,40}",
            key in any::<u128>(),
            payload_len in 0u32..200,
        ) {
            let store = StorePrefix { request_id, namespace, key: BlockKey(key), payload_len };
            let mut frame = encode_store_head(&store);
            frame.resize(frame.len() + payload_len as usize, 7);
            let body = &frame[HEADER_BYTES..];
            let body_len = body.len() as u32;
            let prefix_len = body.len() - payload_len as usize;
            for arrived in 0..=body.len() {
                let decoded = decode_store_prefix(&body[..arrived], body_len).expect("valid");
                if arrived < prefix_len {
                    prop_assert!(decoded.is_none(), "decoded from {} of {} prefix bytes", arrived, prefix_len);
                } else {
                    prop_assert_eq!(decoded, Some((store.clone(), prefix_len)));
                }
            }
            // A body too short for any prefix is an error once it is all here.
            prop_assert!(decode_store_prefix(&body[..prefix_len - 1], prefix_len as u32 - 1).is_err());
        }

        /// The gateway's borrowing decoder of `StoreFromRegion` reads what
        /// the frame's encoder wrote, and refuses what `Frame::decode`
        /// refuses: a body cut short, or one with bytes left over.
        #[test]
        fn store_from_region_decodes_borrowed_as_owned(
            request_id in any::<u64>(),
            namespace in "[a-z]{0,40}",
            key in any::<u128>(),
            region_id in any::<u32>(),
            offset in any::<u64>(),
            layer_stride in any::<u64>(),
        ) {
            let store = StoreFromRegion { request_id, namespace, key: BlockKey(key), region_id, offset, layer_stride };
            let frame = Frame::StoreFromRegion(store.clone()).encode();
            let body = &frame[HEADER_BYTES..];
            let decoded = decode_store_from_region(body).expect("decodes");
            prop_assert_eq!(decoded.to_owned(), store);
            prop_assert!(decode_store_from_region(&body[..body.len() - 1]).is_err());
            let mut longer = body.to_vec();
            longer.push(0);
            prop_assert!(decode_store_from_region(&longer).is_err());
            prop_assert!(Frame::decode(FrameType::StoreFromRegion, &longer).is_err());
        }

        #[test]
        fn loads_round_trip(
            request_id in any::<u64>(),
            blocks in prop::collection::vec((any::<u128>(), 0u16..100, 1u16..100, any::<u64>()), 0..50),
        ) {
            let load = Load {
                request_id,
                namespace: "ns-1".into(),
                region_id: 3,
                layer_stride: 8192,
                blocks: blocks.into_iter().map(|(key, start, length, dest_offset)| BlockLoad {
                    key: BlockKey(key), layers: start..start + length, dest_offset,
                }).collect(),
            };
            prop_assert_eq!(round_trip(&Frame::Load(load.clone())), Frame::Load(load));
        }

        #[test]
        fn key_bits_round_trip_bit_for_bit(bits in prop::collection::vec(any::<bool>(), 0..300)) {
            let answer = KeyBits { request_id: 5, code: ErrorCode::Ok, message: String::new(), bits };
            for frame in [Frame::LookupResult(answer.clone()), Frame::RemoveResult(answer)] {
                prop_assert_eq!(round_trip(&frame), frame);
            }
        }

        #[test]
        fn truncating_a_frame_is_an_error_not_a_panic(cut in 0usize..200) {
            let frame = Frame::BlockDone { request_id: 1, block_index: 2, code: ErrorCode::Corrupt, message: "x".repeat(100) };
            let bytes = frame.encode();
            let body = &bytes[HEADER_BYTES..];
            let cut = cut.min(body.len().saturating_sub(1));
            prop_assert!(Frame::decode(FrameType::BlockDone, &body[..cut]).is_err());
        }
    }
}
