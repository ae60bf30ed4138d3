//! The `uring` backend: KV blocks in fixed-size slots of O_DIRECT files on a local
//! or mounted file system, read with io_uring into registered staging buffers.
//!
//! [`UringStore`] is the store directory (manifest, lock), shared by the shards of
//! one process; [`UringShard`] is one core's part of it: the keys that hash to its
//! shard, its own files, ring and index. No state is shared between shards.
//!
//! Crash safety of `put`: (1) the records of reused slots are zeroed and synced,
//! (2) the data is written and synced, (3) the new records are written and synced,
//! (4) the block becomes visible. A crash at any point leaves each slot either with
//! a valid record whose data is complete, or with no valid record (a missing block).
//! Every read is verified against the per-layer checksums before it is returned.

mod engine;
pub mod format;
mod index;
mod put;
mod remove;
mod use_order;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use block_layout::{BlockKey, Geometry, LayerPlacement};
use staging::{StagingBuffer, StagingSlab};

use crate::sys;
use crate::sys::uring::Completion;
use crate::{
    BlockStore, IncomingBlock, IoOp, KeyBatchCompletion, KeyBatchKind, NamespaceId, NamespaceSpec,
    NamespaceStats, PutCompletion, PutStarted, ReadCompletion, ReadRequest, Rejected, ScrubCursor,
    ScrubStep, ShardStats, StoreError,
};
pub use engine::IoEngine;
use engine::{Direction, Engine};
use format::{BlockHeader, Manifest, ManifestNamespace, Record};
use index::{NextLive, SlotTable};

/// Slots a scrub step looks at, at most: a mostly empty store is walked
/// without holding up the core.
const SCRUB_SLOTS_PER_STEP: u32 = 4096;
use put::{take_caller_puts, PutInFlight, SyncSeries, SyncedFile, CALLER_PUT_TAG, PUT_WRITES_MAX};

/// The store directory of one process: validated manifest and an exclusive lock.
#[derive(Debug)]
pub struct UringStore {
    root: PathBuf,
    manifest: Manifest,
    /// Held (flock) for the life of the store so two processes never share it.
    _lock: File,
    /// How shards move bytes (io_uring, or the blocking fallback).
    io_engine: IoEngine,
}

impl UringStore {
    /// Opens or creates the store at `root` for `shards` shards and `namespaces`.
    /// Geometry and shard count are fixed once written; capacity may grow.
    pub fn open(
        root: &Path,
        shards: u32,
        namespaces: &[NamespaceSpec],
    ) -> Result<Arc<Self>, StoreError> {
        Self::open_with(root, shards, namespaces, IoEngine::Auto)
    }

    /// [`UringStore::open`], with the I/O engine its shards use.
    pub fn open_with(
        root: &Path,
        shards: u32,
        namespaces: &[NamespaceSpec],
        io_engine: IoEngine,
    ) -> Result<Arc<Self>, StoreError> {
        assert!(shards > 0, "a store has at least one shard");
        std::fs::create_dir_all(root).map_err(|source| io_error(IoOp::Open, root, 0, 0, source))?;
        let lock = lock_store(root)?;
        let manifest_path = root.join(format::MANIFEST_FILE);
        let wanted = wanted_manifest(shards, namespaces);
        let manifest = match std::fs::read_to_string(&manifest_path) {
            Ok(text) => {
                let existing = Manifest::decode(&text).map_err(|problem| StoreError::Layout {
                    path: manifest_path.clone(),
                    problem: format!("unreadable manifest: {problem}"),
                    fix: "restore the file or move the store directory away and re-import".into(),
                })?;
                merge_manifest(&manifest_path, existing, wanted)?
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => wanted,
            Err(source) => return Err(io_error(IoOp::Read, &manifest_path, 0, 0, source)),
        };
        // Space first: a capacity the disk cannot hold is refused before the
        // manifest records it (it could not be lowered again after).
        reserve_files(root, &manifest)?;
        write_manifest(root, &manifest)?;
        for name in unconfigured(&manifest, namespaces) {
            tracing::warn!(
                "namespace {name:?} is in the store at {} but not in the config: its blocks and reserved space are still held, though clients are not offered it; `dualpath drop-namespace {name}` deletes it",
                root.display()
            );
        }
        Ok(Arc::new(Self {
            root: root.to_owned(),
            manifest,
            _lock: lock,
            io_engine,
        }))
    }

    pub fn shards(&self) -> u32 {
        self.manifest.shards
    }

    /// The namespaces the store holds that `configured` does not list (a
    /// namespace taken out of the config stays in the store, its shards'
    /// files open, until it is dropped).
    pub fn unconfigured_namespaces(&self, configured: &[NamespaceSpec]) -> Vec<String> {
        unconfigured(&self.manifest, configured)
    }

    /// Deletes namespace `name` from the (closed) store at `root`: every
    /// block of it and its files, then its entry in the manifest; returns
    /// the bytes its files held. Refused while the namespace is still in
    /// `configured` (the next start would create it again, empty). The
    /// files go first: a crash between the two steps leaves the namespace
    /// listed and empty (its files created again at the next start), never
    /// a listing that could pick up old records.
    pub fn drop_namespace(
        root: &Path,
        name: &str,
        configured: &[NamespaceSpec],
    ) -> Result<u64, StoreError> {
        let _lock = lock_store(root)?;
        let manifest_path = root.join(format::MANIFEST_FILE);
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|source| io_error(IoOp::Read, &manifest_path, 0, 0, source))?;
        let mut manifest = Manifest::decode(&text).map_err(|problem| StoreError::Layout {
            path: manifest_path.clone(),
            problem: format!("unreadable manifest: {problem}"),
            fix: "restore the file".into(),
        })?;
        if !manifest.namespaces.iter().any(|entry| entry.name == name) {
            return Err(StoreError::UnknownNamespace { name: name.into() });
        }
        if configured.iter().any(|spec| spec.name == name) {
            return Err(StoreError::Layout {
                path: root.to_owned(),
                problem: format!("namespace {name:?} is still in the config"),
                fix: "take it out of the config first (the gateway would create it again, empty)"
                    .into(),
            });
        }
        let directory = root.join(name);
        let mut freed = 0;
        if let Ok(entries) = std::fs::read_dir(&directory) {
            for entry in entries.flatten() {
                freed += entry
                    .metadata()
                    .map_or(0, |metadata| metadata.blocks() * 512);
            }
        }
        match std::fs::remove_dir_all(&directory) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(io_error(IoOp::Write, &directory, 0, 0, source)),
        }
        sync_directory(root)?;
        manifest.namespaces.retain(|entry| entry.name != name);
        write_manifest(root, &manifest)?;
        Ok(freed)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Opens shard `shard` on the calling core: its files, its ring with `slab`
    /// registered, and its index recovered from the header files.
    pub fn open_shard(
        self: &Arc<Self>,
        shard: u32,
        slab: Rc<StagingSlab>,
        queue_depth: u32,
    ) -> Result<UringShard, StoreError> {
        assert!(
            shard < self.manifest.shards,
            "shard {shard} of {}",
            self.manifest.shards
        );
        let mut namespaces = Vec::with_capacity(self.manifest.namespaces.len());
        let mut next_generation = 1;
        for (index, entry) in self.manifest.namespaces.iter().enumerate() {
            let file_index = u32::try_from(index).expect("namespace count bounded by config");
            let (namespace, highest) = ShardNamespace::open(&self.root, shard, entry, file_index)?;
            next_generation = next_generation.max(highest + 1);
            namespaces.push(namespace);
        }
        // Fixed files: the data files, then the header files (synced by puts).
        let header_base = u32::try_from(namespaces.len()).expect("namespace count bounded");
        for (index, namespace) in namespaces.iter_mut().enumerate() {
            namespace.header_file_index =
                header_base + u32::try_from(index).expect("namespace count bounded");
        }
        let files: Vec<&File> = namespaces
            .iter()
            .map(|namespace| &namespace.data_file)
            .chain(namespaces.iter().map(|namespace| &namespace.header_file))
            .collect();
        let depth = queue_depth.next_power_of_two();
        // Reads get `depth`; put writes and syncs have room of their own.
        let ops = depth + PUT_WRITES_MAX as u32 + 2 * header_base;
        let ring = Engine::open(self.io_engine, ops, slab, &files).map_err(|source| {
            if engine::io_uring_unavailable(&source) {
                StoreError::Layout {
                    path: self.root.clone(),
                    problem: format!("io_uring cannot be set up here ({source})"),
                    fix: "allow io_uring (Docker's default seccomp profile and gVisor refuse it; see kernel.io_uring_disabled), or set storage.io_engine = \"auto\" to fall back to pread/pwrite on worker threads".into(),
                }
            } else {
                io_error(IoOp::Ring, &self.root, 0, 0, source)
            }
        })?;
        Ok(UringShard {
            ring,
            pending: (0..ops).map(|_| None).collect(),
            free_ops: (0..ops).rev().collect(),
            completions: Vec::with_capacity(ops as usize * 2),
            finished_reads: Vec::with_capacity(depth as usize),
            reads_in_flight: 0,
            read_capacity: depth as usize,
            puts: Vec::new(),
            next_put_id: 0,
            put_writes_in_flight: 0,
            finished_puts: Vec::new(),
            removes: Vec::new(),
            finished_removes: Vec::new(),
            spare_staging_lists: Vec::new(),
            spare_checksums: Vec::new(),
            record: Vec::new(),
            namespaces,
            next_generation,
            drop_corrupt: false,
            stats: ShardStats::default(),
            shard,
            _store: Arc::clone(self),
        })
    }
}

fn unconfigured(manifest: &Manifest, configured: &[NamespaceSpec]) -> Vec<String> {
    manifest
        .namespaces
        .iter()
        .filter(|entry| !configured.iter().any(|spec| spec.name == entry.name))
        .map(|entry| entry.name.clone())
        .collect()
}

fn wanted_manifest(shards: u32, namespaces: &[NamespaceSpec]) -> Manifest {
    Manifest {
        shards,
        namespaces: namespaces
            .iter()
            .map(|spec| {
                let slots = spec.capacity_bytes / spec.geometry.slot_bytes() / u64::from(shards);
                ManifestNamespace {
                    name: spec.name.clone(),
                    geometry: spec.geometry,
                    slots_per_shard: u32::try_from(slots.max(1)).unwrap_or(u32::MAX),
                }
            })
            .collect(),
    }
}

/// Checks the configured store against the one on disk: same shard count and
/// geometry; capacity may grow but not shrink; new namespaces are added.
fn merge_manifest(
    path: &Path,
    existing: Manifest,
    wanted: Manifest,
) -> Result<Manifest, StoreError> {
    let layout_error = |problem: String, fix: String| StoreError::Layout {
        path: path.to_owned(),
        problem,
        fix,
    };
    if existing.shards != wanted.shards {
        return Err(layout_error(
            format!(
                "the store was created for {} shards, the config asks for {}",
                existing.shards, wanted.shards
            ),
            format!(
                "set gateway.cores = {} or import into a new store directory",
                existing.shards
            ),
        ));
    }
    let mut merged = existing.clone();
    for namespace in wanted.namespaces {
        match merged.namespaces.iter_mut().find(|old| old.name == namespace.name) {
            None => merged.namespaces.push(namespace),
            Some(old) if old.geometry != namespace.geometry => {
                return Err(layout_error(
                    format!("namespace {:?} was stored with geometry {:?}, the config says {:?}", old.name, old.geometry, namespace.geometry),
                    "restore the old geometry in the config or use a new namespace name".into(),
                ))
            }
            Some(old) if namespace.slots_per_shard < old.slots_per_shard => {
                return Err(layout_error(
                    format!(
                        "namespace {:?} would shrink from {} to {} slots per shard, losing stored blocks",
                        old.name, old.slots_per_shard, namespace.slots_per_shard
                    ),
                    "restore the old capacity (it may grow, not shrink) or move the store directory away".into(),
                ))
            }
            Some(old) => old.slots_per_shard = namespace.slots_per_shard,
        }
    }
    Ok(merged)
}

fn data_path(directory: &Path, shard: u32) -> PathBuf {
    directory.join(format!("shard-{shard}.blocks"))
}

fn header_path(directory: &Path, shard: u32) -> PathBuf {
    directory.join(format!("shard-{shard}.headers"))
}

fn use_order_path(directory: &Path, shard: u32) -> PathBuf {
    directory.join(format!("shard-{shard}.use-order"))
}

/// Creates every shard's files at the manifest's capacity, with their space
/// reserved, and makes their names durable. Refused as a whole, before any
/// file grows, when the file system has less room than the growth needs.
fn reserve_files(root: &Path, manifest: &Manifest) -> Result<(), StoreError> {
    let mut growth = Vec::new();
    for entry in &manifest.namespaces {
        let directory = root.join(&entry.name);
        std::fs::create_dir_all(&directory)
            .map_err(|source| io_error(IoOp::Open, &directory, 0, 0, source))?;
        let slots = u64::from(entry.slots_per_shard);
        let record_bytes = format::record_bytes(entry.geometry.layers) as u64;
        for shard in 0..manifest.shards {
            for (path, len) in [
                (
                    data_path(&directory, shard),
                    slots * entry.geometry.slot_bytes(),
                ),
                (header_path(&directory, shard), slots * record_bytes),
            ] {
                let file = open_for_update(&path)?;
                growth.push((file, path, len));
            }
        }
    }
    let mut needed = 0;
    for (file, path, len) in &growth {
        let current = file
            .metadata()
            .map_err(|source| io_error(IoOp::Open, path, 0, 0, source))?
            .len();
        needed += len.saturating_sub(current);
    }
    if needed > 0 {
        let free = File::open(root)
            .and_then(|directory| sys::fs::available_bytes(&directory))
            .map_err(|source| io_error(IoOp::Open, root, 0, 0, source))?;
        if free < needed {
            return Err(no_space(root, needed, Some(free)));
        }
        tracing::info!(
            "reserving {} in {} for the namespaces' capacity ({} free)",
            mib(needed),
            root.display(),
            mib(free)
        );
    }
    for (file, path, len) in &growth {
        grow_file(file, path, *len)?;
    }
    // The files' names, and the namespace directories', must outlive a power
    // cut as well as the blocks synced into them.
    for entry in &manifest.namespaces {
        sync_directory(&root.join(&entry.name))?;
    }
    sync_directory(root)
}

fn open_for_update(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| io_error(IoOp::Open, path, 0, 0, source))
}

fn write_manifest(root: &Path, manifest: &Manifest) -> Result<(), StoreError> {
    let path = root.join(format::MANIFEST_FILE);
    let temporary = root.join(format!("{}.tmp", format::MANIFEST_FILE));
    let write = || -> std::io::Result<()> {
        std::fs::write(&temporary, manifest.encode())?;
        File::open(&temporary)?.sync_all()?;
        std::fs::rename(&temporary, &path)?;
        File::open(root)?.sync_all()
    };
    write().map_err(|source| io_error(IoOp::Write, &path, 0, 0, source))
}

/// Makes the entries of files just created in `path` durable: a file's own
/// fsync need not cover its name in the directory (POSIX leaves that to an
/// fsync of the directory; ext4 and XFS happen to commit it with the file).
fn sync_directory(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|directory| directory.sync_all())
        .map_err(|source| io_error(IoOp::Sync, path, 0, 0, source))
}

fn lock_store(root: &Path) -> Result<File, StoreError> {
    let path = root.join("LOCK");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| io_error(IoOp::Open, &path, 0, 0, source))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Layout {
            path: root.to_owned(),
            problem: "the store is in use by another process (a running gateway?)".into(),
            fix: "stop that process, or give this one another storage.path".into(),
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(io_error(IoOp::Lock, &path, 0, 0, source)),
    }
}

fn io_error(op: IoOp, path: &Path, offset: u64, len: u64, source: std::io::Error) -> StoreError {
    StoreError::Io {
        op,
        path: path.to_owned(),
        offset,
        len,
        source,
    }
}

/// One namespace's files and index within one shard.
#[derive(Debug)]
struct ShardNamespace {
    name: String,
    geometry: Geometry,
    namespace_hash: u32,
    table: SlotTable,
    data_file: File,
    data_path: PathBuf,
    header_file: File,
    header_path: PathBuf,
    /// Where a stopping gateway saves the use order (`use_order.rs`).
    use_order_path: PathBuf,
    /// The data file's io_uring fixed-file index.
    file_index: u32,
    /// The header file's (set when the shard registers its files).
    header_file_index: u32,
    record_bytes: usize,
    /// Syncs that make puts durable, shared by the puts waiting for them.
    data_sync: SyncSeries,
    header_sync: SyncSeries,
}

impl ShardNamespace {
    /// Opens (creating or growing) the files, recovers the index and the use
    /// order saved at the last stop. Returns the highest generation found
    /// (or numbered before the save).
    fn open(
        root: &Path,
        shard: u32,
        entry: &ManifestNamespace,
        file_index: u32,
    ) -> Result<(Self, u64), StoreError> {
        // The files exist at their full size: `UringStore::open` made them.
        let directory = root.join(&entry.name);
        let geometry = entry.geometry;
        let data_path = data_path(&directory, shard);
        let data_file = open_data_file(&data_path)?;
        let header_path = header_path(&directory, shard);
        let record_bytes = format::record_bytes(geometry.layers);
        let header_file = open_for_update(&header_path)?;
        let mut namespace = Self {
            name: entry.name.clone(),
            geometry,
            namespace_hash: format::namespace_hash(&entry.name),
            table: SlotTable::new(entry.slots_per_shard, geometry.layers),
            data_file,
            data_path,
            header_file,
            header_path,
            use_order_path: use_order_path(&directory, shard),
            file_index,
            header_file_index: 0,
            record_bytes,
            data_sync: SyncSeries::default(),
            header_sync: SyncSeries::default(),
        };
        let highest = namespace.recover()?;
        let saved_next = namespace.restore_use_order();
        Ok((namespace, highest.max(saved_next.saturating_sub(1))))
    }

    /// Rebuilds the index from the header file: valid records in generation order.
    fn recover(&mut self) -> Result<u64, StoreError> {
        let mut records = Vec::new();
        (&self.header_file)
            .rewind()
            .map_err(|source| io_error(IoOp::Read, &self.header_path, 0, 0, source))?;
        (&self.header_file)
            .read_to_end(&mut records)
            .map_err(|source| io_error(IoOp::Read, &self.header_path, 0, 0, source))?;
        let mut valid = Vec::new();
        for (slot, bytes) in records.chunks_exact(self.record_bytes).enumerate() {
            let Ok(slot) = u32::try_from(slot) else { break };
            if slot >= self.table.slot_count() {
                break;
            }
            match format::decode_record(bytes) {
                Record::Empty => {}
                Record::Valid(header) if self.header_matches(&header) => valid.push((slot, header)),
                Record::Valid(_) | Record::Invalid(_) => self.table.mark_record_present(slot, None),
            }
        }
        valid.sort_by_key(|(_, header)| header.generation);
        let highest = valid.last().map_or(0, |(_, header)| header.generation);
        for (slot, header) in valid {
            self.table
                .recover(slot, header.key, header.generation, &header.layer_crcs);
        }
        Ok(highest)
    }

    fn header_matches(&self, header: &BlockHeader) -> bool {
        header.namespace_hash == self.namespace_hash
            && header.layout == self.geometry.layout
            && u64::from(header.layer_bytes) == self.geometry.layer_bytes()
            && header.layer_crcs.len() == usize::from(self.geometry.layers)
    }

    fn slot_offset(&self, slot: u32) -> u64 {
        u64::from(slot) * self.geometry.slot_bytes()
    }

    fn write_record(&self, slot: u32, record: &[u8]) -> Result<(), StoreError> {
        let offset = u64::from(slot) * self.record_bytes as u64;
        self.header_file
            .write_all_at(record, offset)
            .map_err(|source| {
                io_error(
                    IoOp::Write,
                    &self.header_path,
                    offset,
                    record.len() as u64,
                    source,
                )
            })
    }
}

fn open_data_file(path: &Path) -> Result<File, StoreError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|source| {
            if source.raw_os_error() == Some(libc::EINVAL) {
                StoreError::Layout {
                    path: path.to_owned(),
                    problem: "the file system does not support O_DIRECT (tmpfs?)".into(),
                    fix: "put storage.path on a disk file system (ext4, xfs) or a mounted distributed file system".into(),
                }
            } else {
                io_error(IoOp::Open, path, 0, 0, source)
            }
        })?;
    Ok(file)
}

/// Grows `file` to `len` bytes, reserving the disk space: a store whose
/// capacity the disk cannot hold is refused when it opens, not when a put
/// finds the disk full. Where the file system cannot reserve (no
/// `fallocate`), the file grows sparse once the free space is checked.
fn grow_file(file: &File, path: &Path, len: u64) -> Result<(), StoreError> {
    let current = file
        .metadata()
        .map_err(|source| io_error(IoOp::Open, path, 0, 0, source))?
        .len();
    if current >= len {
        return Ok(());
    }
    let more = len - current;
    match sys::fs::allocate(file, current, more) {
        Ok(()) => Ok(()),
        Err(error) if error.raw_os_error() == Some(libc::ENOSPC) => {
            // What the failed call allocated goes back (ext4 keeps it).
            let _ = file.set_len(current);
            Err(no_space(path, more, sys::fs::available_bytes(file).ok()))
        }
        Err(error) if error.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            let free = sys::fs::available_bytes(file)
                .map_err(|source| io_error(IoOp::Open, path, 0, 0, source))?;
            if free < more {
                return Err(no_space(path, more, Some(free)));
            }
            tracing::warn!(
                "{}: the file system cannot reserve space (no fallocate): the file grows sparse, \
                 and a put fails if the disk fills later",
                path.display()
            );
            file.set_len(len)
                .map_err(|source| io_error(IoOp::Write, path, current, more, source))
        }
        Err(source) => Err(io_error(IoOp::Write, path, current, more, source)),
    }
}

fn no_space(path: &Path, needed: u64, free: Option<u64>) -> StoreError {
    StoreError::Layout {
        path: path.to_owned(),
        problem: format!(
            "the namespaces' capacity needs {} more on this file system, which has {} free",
            mib(needed),
            free.map_or_else(|| "too little".into(), mib),
        ),
        fix: "lower the namespaces' capacity in the config, or free space there".into(),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

#[derive(Debug)]
enum PendingOp {
    Read {
        tag: u64,
        key: BlockKey,
        namespace: u16,
        slot: u32,
        first_layer: u16,
        span: Span,
        placement: LayerPlacement,
        buffer: StagingBuffer,
    },
    Write {
        /// The put it is part of (`PutInFlight::id`).
        put: u64,
        namespace: u16,
        span: Span,
        buffer: StagingBuffer,
    },
    Sync {
        namespace: u16,
        file: SyncedFile,
    },
}

/// Where an operation touches its data file.
#[derive(Debug, Clone, Copy)]
struct Span {
    offset: u64,
    len: u64,
}

/// One core's part of a [`UringStore`]. `!Send`: it owns that core's ring and
/// staging buffers.
#[derive(Debug)]
pub struct UringShard {
    /// Field order is drop order: the ring (and its registration of the slab and
    /// files) goes first, then the in-flight table's buffers, then the files.
    ring: Engine,
    /// In-flight operations by `user_data`; never more than the ring's depth, so
    /// neither queue of the ring can overflow.
    pending: Vec<Option<PendingOp>>,
    free_ops: Vec<u32>,
    completions: Vec<Completion>,
    finished_reads: Vec<ReadCompletion>,
    reads_in_flight: usize,
    /// Most reads in flight (the configured queue depth).
    read_capacity: usize,
    /// Puts started and not finished, oldest first.
    puts: Vec<PutInFlight>,
    next_put_id: u64,
    put_writes_in_flight: usize,
    finished_puts: Vec<PutCompletion>,
    /// Removals waiting for their header sync, and those finished.
    removes: Vec<remove::RemoveInFlight>,
    finished_removes: Vec<KeyBatchCompletion>,
    /// The staging lists and layer checksums of finished puts, emptied, for
    /// the next blocks lent: a put allocates nothing once the shard is warm.
    spare_staging_lists: Vec<Vec<StagingBuffer>>,
    spare_checksums: Vec<Vec<u32>>,
    /// A header record being written, reused.
    record: Vec<u8>,
    namespaces: Vec<ShardNamespace>,
    next_generation: u64,
    /// Whether a block that fails its checksum is taken out of the store
    /// (`drop_corrupt_blocks`).
    drop_corrupt: bool,
    stats: ShardStats,
    shard: u32,
    _store: Arc<UringStore>,
}

impl UringShard {
    /// From now on, a block whose read fails its checksum is taken out of the
    /// store, not only refused: out of the index at once, so lookups no
    /// longer find it and the engine computes and stores it again instead of
    /// failing on it every turn, and its records zeroed so that no restart
    /// brings it back (`remove.rs`, `drop_corrupt_block`). The gateway turns
    /// this on; the offline tools only with `verify --drop-corrupt`.
    pub fn drop_corrupt_blocks(&mut self, on: bool) {
        self.drop_corrupt = on;
    }

    fn namespace(&self, namespace: NamespaceId) -> &ShardNamespace {
        &self.namespaces[usize::from(namespace.0)]
    }

    fn take_op(&mut self, op: PendingOp) -> Result<u64, PendingOp> {
        match self.free_ops.pop() {
            Some(index) => {
                self.pending[index as usize] = Some(op);
                Ok(u64::from(index))
            }
            None => Err(op),
        }
    }

    /// Validates a read and finds where it lies on disk.
    fn locate_read(
        &self,
        request: &ReadRequest,
        buffer: &StagingBuffer,
    ) -> Result<(u32, Span, LayerPlacement), StoreError> {
        let namespace = self
            .namespaces
            .get(usize::from(request.namespace.0))
            .ok_or_else(|| StoreError::UnknownNamespace {
                name: format!("#{}", request.namespace.0),
            })?;
        let geometry = namespace.geometry;
        if request.layers.start >= request.layers.end || request.layers.end > geometry.layers {
            return Err(StoreError::LayerRange {
                namespace: namespace.name.clone(),
                layers: request.layers.clone(),
                layer_count: geometry.layers,
            });
        }
        let slot = namespace
            .table
            .lookup(request.key)
            .ok_or_else(|| StoreError::NotFound {
                namespace: namespace.name.clone(),
                key: request.key,
            })?;
        let disk = geometry.disk_span(request.layers.clone());
        if disk.len > buffer.len() as u64 {
            return Err(StoreError::BufferTooSmall {
                needed: disk.len,
                buffer: buffer.len(),
            });
        }
        let span = Span {
            offset: namespace.slot_offset(slot) + disk.slot_offset,
            len: disk.len,
        };
        Ok((slot, span, disk.placement))
    }

    /// Submits queued operations, waits for `want` completions, and handles them.
    fn pump(&mut self, want: usize) -> Result<(), StoreError> {
        self.ring
            .submit_and_wait(want)
            .map_err(|source| io_error(IoOp::Ring, &self.namespaces[0].data_path, 0, 0, source))?;
        let mut completions = std::mem::take(&mut self.completions);
        self.ring.drain(&mut completions);
        for completion in completions.drain(..) {
            self.complete(completion);
        }
        self.completions = completions;
        self.advance_puts();
        Ok(())
    }

    /// Whether any operation is in flight (a wait for one would return).
    fn any_op_pending(&self) -> bool {
        self.free_ops.len() < self.pending.len()
    }

    fn complete(&mut self, completion: Completion) {
        let index = usize::try_from(completion.user_data).expect("user_data is an op index");
        let op = self.pending[index]
            .take()
            .expect("a completion for an operation in flight");
        self.free_ops
            .push(u32::try_from(index).expect("op index below the ring depth"));
        match op {
            PendingOp::Read {
                tag,
                key,
                namespace,
                slot,
                first_layer,
                span,
                placement,
                buffer,
            } => {
                self.reads_in_flight -= 1;
                let shard_namespace = &self.namespaces[usize::from(namespace)];
                let mut result = check_transfer(
                    &shard_namespace.data_path,
                    IoOp::Read,
                    span,
                    completion.result,
                )
                .and_then(|()| {
                    verify_layers(
                        shard_namespace,
                        key,
                        slot,
                        first_layer,
                        span,
                        placement,
                        &buffer,
                    )
                });
                self.namespaces[usize::from(namespace)].table.unpin(slot);
                if let Err(StoreError::Corrupt { dropped, .. }) = &mut result {
                    *dropped = self.drop_corrupt && self.drop_corrupt_block(namespace, key, slot);
                }
                match &result {
                    Ok(()) => {
                        self.stats.reads += 1;
                        self.stats.read_bytes +=
                            placement.layer_bytes * u64::from(placement.layer_count);
                    }
                    Err(StoreError::Corrupt { .. }) => self.stats.checksum_failures += 1,
                    Err(_) => self.stats.read_errors += 1,
                }
                self.finished_reads.push(ReadCompletion {
                    tag,
                    result: result.map(|()| placement),
                    buffer,
                });
            }
            PendingOp::Write {
                put,
                namespace,
                span,
                buffer,
            } => {
                drop(buffer);
                self.put_writes_in_flight -= 1;
                let path = &self.namespaces[usize::from(namespace)].data_path;
                let checked = check_transfer(path, IoOp::Write, span, completion.result);
                let put = self
                    .puts
                    .iter_mut()
                    .find(|in_flight| in_flight.id == put)
                    .expect("a put lives while its writes are in flight");
                put.writes_in_flight -= 1;
                if let Err(error) = checked {
                    put.failure.get_or_insert(error);
                }
            }
            PendingOp::Sync { namespace, file } => {
                let shard_namespace = &mut self.namespaces[usize::from(namespace)];
                match file {
                    SyncedFile::Data => shard_namespace.data_sync.completed(completion.result),
                    SyncedFile::Headers => shard_namespace.header_sync.completed(completion.result),
                }
            }
        }
    }

    fn acquire_buffer(&mut self) -> Result<StagingBuffer, StoreError> {
        loop {
            if let Some(buffer) = self.slab().acquire() {
                return Ok(buffer);
            }
            if self.pending.iter().all(Option::is_none) {
                return Err(StoreError::Busy {
                    what: "no free staging buffer for a write",
                });
            }
            self.pump(1)?;
        }
    }

    /// Submits a write of the first `within_slot.len` bytes of `buffer` to
    /// `within_slot.offset` of the slot, for put `put`. The caller keeps put
    /// writes within `PUT_WRITES_MAX`, so there is room in the op table.
    fn submit_write(
        &mut self,
        put: u64,
        namespace: NamespaceId,
        slot: u32,
        within_slot: Span,
        buffer: StagingBuffer,
    ) {
        let shard_namespace = self.namespace(namespace);
        let span = Span {
            offset: shard_namespace.slot_offset(slot) + within_slot.offset,
            len: within_slot.len,
        };
        let file_index = shard_namespace.file_index;
        let len =
            u32::try_from(span.len).expect("a span fits a staging buffer, which is below 4 GiB");
        let op = PendingOp::Write {
            put,
            namespace: namespace.0,
            span,
            buffer,
        };
        let user_data = self
            .take_op(op)
            .unwrap_or_else(|_| unreachable!("put writes have room of their own"));
        let Some(PendingOp::Write { buffer, .. }) = self.pending[user_data as usize].as_mut()
        else {
            unreachable!("just stored a write")
        };
        // SAFETY: the buffer now lives in `pending` until its completion is
        // reaped in `complete`; the data file stays open as long as `self`.
        let pushed = unsafe {
            self.ring.push(
                Direction::Write,
                file_index,
                buffer,
                len,
                span.offset,
                user_data,
            )
        };
        assert!(
            pushed,
            "in-flight operations never exceed the submission queue"
        );
        self.put_writes_in_flight += 1;
    }

    /// Submits an `fdatasync` of one of a namespace's files (fixed file
    /// `file_index`). At most one per file is in flight: there is room.
    fn submit_sync(&mut self, namespace: u16, file: SyncedFile, file_index: u32) {
        let user_data = self
            .take_op(PendingOp::Sync { namespace, file })
            .unwrap_or_else(|_| unreachable!("syncs have room of their own"));
        assert!(
            self.ring.push_sync(file_index, user_data),
            "in-flight operations never exceed the submission queue"
        );
    }
}

fn check_transfer(path: &Path, op: IoOp, span: Span, result: i32) -> Result<(), StoreError> {
    if result < 0 {
        return Err(io_error(
            op,
            path,
            span.offset,
            span.len,
            std::io::Error::from_raw_os_error(-result),
        ));
    }
    let done = u64::try_from(result).expect("non-negative");
    if done != span.len {
        return Err(StoreError::ShortRead {
            path: path.to_owned(),
            offset: span.offset,
            expected: span.len,
            got: done,
        });
    }
    Ok(())
}

fn verify_layers(
    namespace: &ShardNamespace,
    key: BlockKey,
    slot: u32,
    first_layer: u16,
    span: Span,
    placement: LayerPlacement,
    buffer: &StagingBuffer,
) -> Result<(), StoreError> {
    let bytes = buffer.as_slice();
    let expected = namespace.table.layer_crcs(slot);
    for index in 0..placement.layer_count {
        let range = placement.layer_range(index);
        let layer = first_layer + index;
        let actual = crc32c::crc32c(&bytes[range.start as usize..range.end as usize]);
        let wanted = expected[usize::from(layer)];
        if actual != wanted {
            return Err(StoreError::Corrupt {
                namespace: namespace.name.clone(),
                key,
                layer,
                expected: wanted,
                actual,
                path: namespace.data_path.clone(),
                offset: span.offset + range.start,
                dropped: false,
            });
        }
    }
    Ok(())
}

impl BlockStore for UringShard {
    /// "io_uring", or "blocking" where io_uring is not available.
    fn io_engine(&self) -> &'static str {
        self.ring.name()
    }

    fn slab(&self) -> &Rc<StagingSlab> {
        self.ring.slab()
    }

    fn shard_index(&self) -> u32 {
        self.shard
    }

    fn has_ready_completions(&self) -> bool {
        self.ring.has_ready()
    }

    fn notify_completions(&self, eventfd: std::os::fd::RawFd) -> Result<(), StoreError> {
        self.ring
            .register_eventfd(eventfd)
            .map_err(|source| io_error(IoOp::Ring, self._store.root(), 0, 0, source))
    }

    fn namespace_id(&self, name: &str) -> Option<NamespaceId> {
        let index = self
            .namespaces
            .iter()
            .position(|namespace| namespace.name == name)?;
        Some(NamespaceId(
            u16::try_from(index).expect("namespace count bounded by config"),
        ))
    }

    fn geometry(&self, namespace: NamespaceId) -> Geometry {
        self.namespace(namespace).geometry
    }

    fn submit_read(&mut self, request: ReadRequest, buffer: StagingBuffer) -> Result<(), Rejected> {
        let (slot, span, placement) = match self.locate_read(&request, &buffer) {
            Ok(found) => found,
            Err(error) => return Err(Rejected { error, buffer }),
        };
        if self.reads_in_flight >= self.read_capacity {
            return Err(Rejected {
                error: StoreError::Busy {
                    what: "the storage queue is full",
                },
                buffer,
            });
        }
        let namespace = request.namespace.0;
        let op = PendingOp::Read {
            tag: request.tag,
            key: request.key,
            namespace,
            slot,
            first_layer: request.layers.start,
            span,
            placement,
            buffer,
        };
        let user_data = match self.take_op(op) {
            Ok(user_data) => user_data,
            Err(PendingOp::Read { buffer, .. }) => {
                return Err(Rejected {
                    error: StoreError::Busy {
                        what: "the storage queue is full",
                    },
                    buffer,
                })
            }
            Err(PendingOp::Write { .. } | PendingOp::Sync { .. }) => {
                unreachable!("a read was offered")
            }
        };
        let shard_namespace = &mut self.namespaces[usize::from(namespace)];
        // Pinned, not touched: the use order changes when a load is
        // accepted (`mark_used`), whatever order its reads go in.
        shard_namespace.table.pin(slot);
        let file_index = shard_namespace.file_index;
        let Some(PendingOp::Read { buffer, .. }) = self.pending[user_data as usize].as_mut() else {
            unreachable!("just stored a read")
        };
        let len = u32::try_from(span.len).expect("checked against the buffer length");
        // SAFETY: the buffer lives in `pending` until `complete` takes it after the
        // completion is reaped; the slot is pinned, so no put overwrites it meanwhile;
        // the data file stays open and registered as long as `self`.
        let pushed = unsafe {
            self.ring.push(
                Direction::Read,
                file_index,
                buffer,
                len,
                span.offset,
                user_data,
            )
        };
        assert!(
            pushed,
            "in-flight operations never exceed the submission queue"
        );
        self.reads_in_flight += 1;
        Ok(())
    }

    fn start_queued_reads(&mut self) -> Result<(), StoreError> {
        if !self.ring.has_unsubmitted() {
            return Ok(());
        }
        self.ring
            .submit_and_wait(0)
            .map_err(|source| io_error(IoOp::Ring, &self.namespaces[0].data_path, 0, 0, source))
    }

    fn reap(&mut self, out: &mut Vec<ReadCompletion>, wait: bool) -> Result<(), StoreError> {
        let want = usize::from(
            wait && self.finished_reads.is_empty()
                && self.finished_puts.is_empty()
                && self.finished_removes.is_empty()
                && self.any_op_pending(),
        );
        self.pump(want)?;
        out.append(&mut self.finished_reads);
        Ok(())
    }

    fn reads_in_flight(&self) -> usize {
        self.reads_in_flight
    }

    fn queue_capacity(&self) -> usize {
        self.read_capacity
    }

    /// The blocks go through the same stages as `start_put`'s, many at a time
    /// (sharing syncs), and this waits for them all.
    fn put(
        &mut self,
        namespace: NamespaceId,
        blocks: &[(BlockKey, &[u8])],
    ) -> Result<(), StoreError> {
        // Nothing is written when one block has the wrong size.
        for (key, bytes) in blocks {
            self.check_block_size(namespace, *key, bytes.len() as u64)?;
        }
        // Half the slots at most, so that reads and evictions keep a choice.
        let in_flight_max = (self.namespace(namespace).table.slot_count() as usize / 2).max(1);
        let mut outcome = Ok(());
        for (index, (key, bytes)) in blocks.iter().enumerate() {
            while self.caller_puts_in_flight() >= in_flight_max {
                self.pump(1)?;
            }
            if let Err(error) =
                self.begin_put(namespace, *key, bytes, CALLER_PUT_TAG | index as u64)
            {
                outcome = Err(error);
                break;
            }
        }
        while self.caller_puts_in_flight() > 0 {
            self.pump(1)?;
        }
        take_caller_puts(&mut self.finished_puts).and(outcome)
    }

    fn lend_for_put(
        &mut self,
        namespace: NamespaceId,
        key: BlockKey,
        payload_bytes: u64,
    ) -> Result<IncomingBlock, StoreError> {
        self.lend_image(namespace, key, payload_bytes)
    }

    fn start_received_put(&mut self, block: IncomingBlock, tag: u64) -> PutStarted {
        assert!(tag & CALLER_PUT_TAG == 0, "put tags are below 1 << 63");
        match self.begin_received_put(block, tag) {
            Ok(()) => PutStarted::InFlight,
            Err(error) => PutStarted::Finished(Err(error)),
        }
    }

    fn lends_staging(&self) -> bool {
        true
    }

    /// A put takes staging buffers for its block's disk image first.
    fn put_staging_buffers(&self, namespace: NamespaceId) -> u32 {
        let chunk_bytes = self.ring.slab().buffer_bytes() as u64;
        let slot_bytes = self.namespace(namespace).geometry.slot_bytes();
        u32::try_from(slot_bytes.div_ceil(chunk_bytes)).unwrap_or(u32::MAX)
    }

    fn reap_puts(&mut self, out: &mut Vec<PutCompletion>) {
        out.append(&mut self.finished_puts);
    }

    fn puts_in_flight(&self) -> usize {
        self.puts.len() + self.finished_puts.len()
    }

    /// Lookups are answered from the index; removals once their records'
    /// clearing is synced (`remove.rs`).
    fn start_key_batch(
        &mut self,
        kind: KeyBatchKind,
        namespace: NamespaceId,
        keys: &[BlockKey],
        tag: u64,
    ) -> Option<Result<Vec<bool>, StoreError>> {
        match kind {
            KeyBatchKind::Lookup => {
                let table = &self.namespace(namespace).table;
                Some(Ok(keys
                    .iter()
                    .map(|key| table.lookup(*key).is_some())
                    .collect()))
            }
            KeyBatchKind::Remove => self.begin_remove(namespace, keys, tag),
        }
    }

    fn reap_key_batches(&mut self, out: &mut Vec<KeyBatchCompletion>) {
        out.append(&mut self.finished_removes);
    }

    /// A removal of one key, waited for here.
    fn delete(&mut self, namespace: NamespaceId, key: BlockKey) -> Result<bool, StoreError> {
        let tag = CALLER_PUT_TAG;
        if let Some(answer) = self.begin_remove(namespace, &[key], tag) {
            return answer.map(|removed| removed[0]);
        }
        loop {
            if let Some(at) = self
                .finished_removes
                .iter()
                .position(|done| done.tag == tag)
            {
                let done = self.finished_removes.remove(at);
                return done.result.map(|removed| removed[0]);
            }
            self.pump(1)?;
        }
    }

    fn contains(&self, namespace: NamespaceId, key: BlockKey) -> bool {
        self.namespace(namespace).table.lookup(key).is_some()
    }

    fn mark_used(&mut self, namespace: NamespaceId, key: BlockKey) {
        let table = &mut self.namespaces[usize::from(namespace.0)].table;
        if let Some(slot) = table.lookup(key) {
            table.touch(slot);
        }
    }

    fn keys(&self, namespace: NamespaceId) -> Vec<BlockKey> {
        self.namespace(namespace).table.keys().collect()
    }

    fn next_to_scrub(&self, cursor: &mut ScrubCursor) -> ScrubStep {
        let Some(namespace) = self.namespaces.get(usize::from(cursor.namespace)) else {
            *cursor = ScrubCursor::default();
            return ScrubStep::PassDone;
        };
        match namespace.table.next_live(cursor.slot, SCRUB_SLOTS_PER_STEP) {
            NextLive::Found { slot, key } => {
                cursor.slot = slot + 1;
                ScrubStep::Block(NamespaceId(cursor.namespace), key)
            }
            NextLive::Searched { next } => {
                cursor.slot = next;
                ScrubStep::Searching
            }
            NextLive::End => {
                cursor.slot = 0;
                cursor.namespace += 1;
                if usize::from(cursor.namespace) < self.namespaces.len() {
                    ScrubStep::Searching
                } else {
                    cursor.namespace = 0;
                    ScrubStep::PassDone
                }
            }
        }
    }

    fn close(&mut self) -> Result<(), StoreError> {
        // Issues the syncs wanted; each completion may make the next due.
        self.advance_puts();
        while self.any_op_pending() {
            self.pump(1)?;
        }
        // A hint: one that cannot be written (a full disk) costs the next
        // start its order, not this stop its success.
        for namespace in &self.namespaces {
            if let Err(error) = namespace.save_use_order(self.next_generation) {
                tracing::warn!(
                    "namespace {:?}: use order not saved ({error}); the next start evicts in the order blocks were stored",
                    namespace.name
                );
            }
        }
        Ok(())
    }

    fn stats(&self) -> ShardStats {
        let mut stats = self.stats.clone();
        stats.namespaces = self
            .namespaces
            .iter()
            .map(|namespace| NamespaceStats {
                name: namespace.name.clone(),
                blocks: namespace.table.live_count() as u64,
                slots: u64::from(namespace.table.slot_count()),
                slot_bytes: namespace.geometry.slot_bytes(),
            })
            .collect();
        stats
    }
}
