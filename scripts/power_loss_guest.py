"""The inside of scripts/power-loss-check.sh: runs as root in a throw-away VM.

A power cut loses whatever the disk had not made durable: writes that no flush
covered yet may or may not be there, in any combination. SIGKILL
(scripts/store-crash-soak.sh) cannot show that, since the kernel keeps the
killed process's writes. Here the store's file system (ext4 or XFS on a RAM disk)
sits on dm-log-writes, which logs every write once a flush has covered it (or
when it completes, with FUA), each flush, and marks we add. A power cut just
before flush F completes leaves the disk with every write logged up to the
flush before F, plus any subset of the writes F would have made durable; the
check builds such disks (`power_cuts`), mounts each (the file system replays
its journal), and a gateway started on it must serve every block it had
acknowledged before that moment, with its exact bytes (a mark is added after
each store_many returns, and the flush an acknowledgement waited for is
logged before its mark); any other block written (acknowledged later, or
evicted) must be there with its exact bytes or not there at all, never torn,
stale or refused as corrupt.

The log covers the store's creation on the empty file system, the first
stores, a restart that grows its capacity (files extended, manifest
rewritten), stores that evict (a reused slot's old record is cleared and
synced first), and a removal of blocks, half of them stored twice before (so
their older copies' records are on disk too): a cut anywhere in that must
leave a store the gateway opens, and a block whose removal was acknowledged
before the cut must not be served (neither copy comes back).
The gateway checks every layer's checksum on the way and the bytes are
compared here.

Usage: power_loss_guest.py DUALPATH_BINARY WORK_DIR   (env: CUTS to check, 0
for all; SEED: which ones and what each keeps; FILE_SYSTEM: ext4 or xfs;
IO_ENGINE)
"""
import os
import random
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass

import dualpath

from store_crash_writer import block_of

NAMESPACE = "kv"
BATCH = 16
# Blocks of 128 KiB: the store is created with 128 slots (64 a shard), takes
# 96 blocks (none evicted, however they fall on the shards), is grown to 192
# slots and takes 8 x 16 more: about 16 of each shard's least recently used
# (preloaded) blocks are evicted, never a new one.
CREATED_CAPACITY, GROWN_CAPACITY = "16MiB", "24MiB"
PRELOADED = 96
BATCHES = 8
# After the last batch: the first REMOVED stored blocks are removed, half of
# them stored a second time just before. Last, so that no later store reuses
# the slots of their older copies (whose records the removal must clear too):
# the final cut, always checked, shows whether one came back.
REMOVE_AFTER_BATCH, REMOVED = BATCHES - 1, 8
MOUNT = "/tmp/dualpath-power-loss"  # the VM's / is read-only; /tmp is tmpfs
STORE_DEVICE, LOG_DEVICE, REPLAY_DEVICE = "/dev/ram0", "/dev/ram1", "/dev/ram2"
SKIPPED = 3  # the exit status that tells power-loss-check.sh the check could not run
LOG_TARGET, CUT_TARGET = "dualpath-power-log", "dualpath-power-cut"

# 320 MiB RAM disks: XFS wants 300 MB at least.
MKFS = {"ext4": "mkfs.ext4 -q -F -b 4096", "xfs": "mkfs.xfs -q -f"}

# dm-log-writes' on-disk format (drivers/md/dm-log-writes.c): a super block in
# sector 0, then per entry one sector holding the header (and a mark's text),
# followed by the written sectors (none for a flush, mark or discard).
LOG_MAGIC = 0x6A736677736872
LOG_FLUSH, LOG_FUA, LOG_DISCARD, LOG_MARK = 1, 2, 4, 8


@dataclass
class LogEntry:
    sector: int
    sectors: int
    flags: int
    mark: str
    data_at: int


def sh(command):
    subprocess.run(command, shell=True, check=True)


def read_log(path):
    with open(path, "rb") as log:
        magic, version, entry_count, sector_bytes = struct.unpack("<QQQI", log.read(28))
        if magic != LOG_MAGIC or version != 1:
            sys.exit(f"{path} holds no dm-log-writes log (magic {magic:#x}, version {version})")
        entries = []
        at = sector_bytes
        for _ in range(entry_count):
            log.seek(at)
            header = log.read(sector_bytes)
            sector, sectors, flags, data_len = struct.unpack_from("<QQQQ", header)
            mark = header[32 : 32 + data_len].decode() if flags & LOG_MARK else ""
            entries.append(LogEntry(sector, sectors, flags, mark, at + sector_bytes))
            at += sector_bytes
            if not flags & LOG_DISCARD:
                at += sectors * sector_bytes
    return sector_bytes, entries


def replay(log, device, sector_bytes, entries, torn=None):
    """Writes `entries` onto `device`; `torn` maps an entry's position in
    `entries` to the number of its first sectors to write."""
    for position, entry in enumerate(entries):
        if not entry.sectors:
            continue
        length = (torn or {}).get(position, entry.sectors) * sector_bytes
        if entry.flags & LOG_DISCARD:
            data = bytes(length)
        else:
            log.seek(entry.data_at)
            data = log.read(length)
        os.pwrite(device, data, entry.sector * sector_bytes)


@dataclass
class PowerCut:
    """A power cut just before the flush at `entries[flush]` completed: every
    entry up to the flush before it (`entries[:durable]`) is on the disk, and
    of the writes since, those that the disk had only in its volatile cache
    made it or not: `kept` lists the ones that did (a write with FUA had
    completed, so it is always there)."""

    durable: int
    flush: int
    kept: list
    unflushed: int
    dropped: int
    torn: dict  # entry -> how many of its first sectors made it


def has_data(entry):
    return entry.sectors > 0


def power_cuts(entries, wanted, chooser):
    """One cut per flush that had writes in the cache (`wanted` of them drawn
    by `chooser`; 0: all), each keeping a random prefix of those writes (the
    order the disk made them durable) or a random subset (a disk may write its
    cache back in any order); and the whole log (all flushed at unmount)."""
    cuts = []
    durable = 0
    for index, entry in enumerate(entries):
        if not entry.flags & LOG_FLUSH:
            continue
        epoch = list(range(durable, index + 1))
        volatile = [i for i in epoch if has_data(entries[i]) and (i == index or not entries[i].flags & LOG_FUA)]
        if volatile:
            cuts.append((durable, index, epoch, volatile))
        durable = index + 1
    if 0 < wanted < len(cuts):
        # Weighted by the writes in the cache, without replacement
        # (Efraimidis-Spirakis): cuts with many writes in flight are where
        # orders differ, and most flushes cover one write.
        cuts = sorted(cuts, key=lambda cut: chooser.random() ** (1 / len(cut[3])))[-wanted:]
    chosen = []
    for durable, flush, epoch, volatile in sorted(cuts):
        torn = {}
        if chooser.random() < 0.5:
            dropped = set(volatile[chooser.randrange(len(volatile) + 1) :])
        else:
            dropped = {i for i in volatile if chooser.random() < 0.4}
            # A disk writes a sector whole, a request not: some of a write's
            # first sectors made it, the rest did not.
            for i in volatile:
                if i not in dropped and entries[i].sectors > 1 and chooser.random() < 0.25:
                    torn[i] = chooser.randrange(1, entries[i].sectors)
        kept = [i for i in epoch if has_data(entries[i]) and i not in dropped]
        chosen.append(PowerCut(durable, flush, kept, len(volatile), len(dropped), torn))
    chosen.append(PowerCut(len(entries), len(entries), [], 0, 0, {}))
    return chosen


class Gateway:
    def __init__(self, binary, config):
        self.binary, self.config = binary, config
        self.log_path = config + ".log"

    def __enter__(self):
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [self.binary, "--config", self.config, "serve"], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while "dualpath gateway ready" not in open(self.log_path).read():
            if self.process.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the gateway did not start: {open(self.log_path).read()}")
            time.sleep(0.02)
        return self

    def kill(self, sig):
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.process.wait(timeout=30)

    def __exit__(self, *_):
        self.kill(signal.SIGTERM)
        self.log.close()


def store(client, keys, size):
    client.store_many(NAMESPACE, [(key, block_of(key, size)) for key in keys])


def check(client, size, written, acked, removed, cut):
    """Every acknowledged key is served with its bytes; every key whose
    removal was acknowledged is not found; every other written key is served
    with its bytes or is not found."""
    chunk = 64
    memory = bytearray(size * chunk)
    region = client.register(memory)
    present = 0
    for first in range(0, len(written), chunk):
        keys = written[first : first + chunk]
        outcomes = client.load(NAMESPACE, region, keys, [i * size for i in range(len(keys))]).wait(timeout=60)
        for index, (key, (state, code, message)) in enumerate(zip(keys, outcomes)):
            if state == "done":
                if key in removed:
                    sys.exit(f"cut before entry {cut}: block {key:#x} is served after its removal was acknowledged")
                if memory[index * size : (index + 1) * size] != block_of(key, size):
                    sys.exit(f"cut before entry {cut}: block {key:#x} is served with wrong bytes")
                present += 1
            elif key in acked:
                sys.exit(f"cut before entry {cut}: acknowledged block {key:#x} is lost: {state} {code} {message}")
            elif code != "NotFound":
                sys.exit(f"cut before entry {cut}: block {key:#x}: {state} {code} {message}")
    return present


def write_config(path, port, capacity):
    with open(path, "w") as out:
        out.write(f"""[gateway]
cores = 2
listen_tcp = "127.0.0.1:{port}"
[staging]
bytes_per_core = "8MiB"
buffer_bytes = "256KiB"
huge_pages = "off"
[storage]
backend = "uring"
path = "{MOUNT}/store"
queue_depth = 16
io_engine = "{os.environ.get("IO_ENGINE", "auto")}"
[[namespace]]
name = "kv"
layers = 16
tokens_per_block = 16
bytes_per_token_per_layer = 512
layout = "layer"
capacity = "{capacity}"
""")
    return path


def main():
    started = time.monotonic()
    binary, work = sys.argv[1:3]
    wanted_cuts = int(os.environ.get("CUTS", "10"))
    port = 20000 + random.randrange(20000)
    address = f"127.0.0.1:{port}"
    created = write_config(os.path.join(work, "created.toml"), port, CREATED_CAPACITY)
    grown = write_config(os.path.join(work, "grown.toml"), port, GROWN_CAPACITY)
    file_system = os.environ.get("FILE_SYSTEM", "ext4")
    print(f"power-loss: RAM disks and {file_system}; a store created, filled, grown and stored into, every write logged", flush=True)
    modules = subprocess.run("modprobe brd rd_nr=3 rd_size=327680 && modprobe dm-log-writes && modprobe dm-snapshot", shell=True)
    if modules.returncode != 0:
        print("power-loss: the VM's kernel lacks brd, dm-log-writes or dm-snapshot (see above)")
        sys.exit(SKIPPED)
    # The disk before: an empty file system. Everything after is logged.
    sh(f"{MKFS[file_system]} {STORE_DEVICE} && dd if={STORE_DEVICE} of={REPLAY_DEVICE} bs=4M status=none")
    sectors = subprocess.run(["blockdev", "--getsz", STORE_DEVICE], check=True, capture_output=True, text=True).stdout.strip()
    sh(f"dmsetup create {LOG_TARGET} --table '0 {sectors} log-writes {STORE_DEVICE} {LOG_DEVICE}'")
    sh(f"dmsetup mknodes {LOG_TARGET}")  # no udev in the VM to make /dev/mapper's node
    sh(f"mkdir -p {MOUNT} && mount /dev/mapper/{LOG_TARGET} {MOUNT}")

    def mark(name):
        sh(f"dmsetup message {LOG_TARGET} 0 mark {name}")

    # A mark after each acknowledgement names what was acknowledged by then.
    acked_at_mark = {}
    preloaded = list(range(1 << 70, (1 << 70) + PRELOADED))
    with Gateway(binary, created):  # creates the store; stopped with SIGTERM
        client = dualpath.Client([address], request_timeout=10.0)
        size = client.namespace(NAMESPACE)["block_bytes"]
        for first in range(0, PRELOADED, BATCH):
            store(client, preloaded[first : first + BATCH], size)
            acked_at_mark[f"preloaded-{first}"] = ("preloaded", first + BATCH)
            mark(f"preloaded-{first}")
        del client
    stored = list(range(1 << 80, (1 << 80) + BATCHES * BATCH))
    with Gateway(binary, grown) as gateway:  # grows the store's files
        mark("grown")
        client = dualpath.Client([address], request_timeout=10.0)
        for batch in range(BATCHES):
            store(client, stored[batch * BATCH : (batch + 1) * BATCH], size)
            acked_at_mark[f"acked-{batch}"] = ("stored", (batch + 1) * BATCH)
            mark(f"acked-{batch}")
            if batch == REMOVE_AFTER_BATCH:
                store(client, stored[: REMOVED // 2], size)
                mark("removing")
                answer = client.remove(NAMESPACE, stored[:REMOVED])
                if answer != [True] * REMOVED:
                    sys.exit(f"the removal answered {answer}: every block was stored")
                mark("removed")
        del client
        gateway.kill(signal.SIGKILL)
    sh(f"umount {MOUNT} && dmsetup remove {LOG_TARGET}")

    sector_bytes, entries = read_log(LOG_DEVICE)
    flushes = sum(1 for entry in entries if entry.flags & LOG_FLUSH)
    # (dm-log-writes adds a mark of its own when the target is removed.)
    marks = [index for index, entry in enumerate(entries) if entry.mark in acked_at_mark]
    if len(marks) != len(acked_at_mark):
        sys.exit(f"the log holds {len(marks)} of the {len(acked_at_mark)} marks added")
    grown_at, removing_at, removed_at = (
        next(index for index, entry in enumerate(entries) if entry.mark == name) for name in ("grown", "removing", "removed")
    )

    def acked_before(flush):
        """What the gateway had acknowledged before the flush at `flush`
        completed. Preloaded blocks count until the grown store took its
        first store: from then on they may be evicted (its LRU ones)."""
        counts = {"preloaded": 0, "stored": 0}
        for index in marks:
            if index < flush:
                kind, count = acked_at_mark[entries[index].mark]
                counts[kind] = count
        acked = set(stored[: counts["stored"]])
        if flush < grown_at:
            acked |= set(preloaded[: counts["preloaded"]])
        if flush > removing_at:  # being removed: there or not
            acked -= set(stored[:REMOVED])
        return acked

    def removed_before(flush):
        """The blocks whose removal the gateway had acknowledged before the
        flush at `flush` completed."""
        return set(stored[:REMOVED]) if flush > removed_at else set()

    seed = int(os.environ.get("SEED") or random.randrange(1 << 32))
    cuts = power_cuts(entries, wanted_cuts, random.Random(seed))
    print(f"power-loss: {len(entries)} logged writes and flushes ({flushes} flushes), checking {len(cuts)} power cuts (SEED={seed}; {time.monotonic() - started:.0f} s)", flush=True)

    written = preloaded + stored
    replayed = 0
    checked_acked = 0
    with open(LOG_DEVICE, "rb") as log:
        device = os.open(REPLAY_DEVICE, os.O_WRONLY)
        for cut in cuts:
            replay(log, device, sector_bytes, entries[replayed : cut.durable])
            replayed = cut.durable
            os.fsync(device)  # the snapshot reads the RAM disk, not its page cache
            # The cache's writes, and the journal replay at mount, go to a
            # throw-away snapshot: the replayed disk stays as the log left it.
            sh(f"dmsetup create {CUT_TARGET} --table '0 {sectors} snapshot {REPLAY_DEVICE} {STORE_DEVICE} N 8'"
               f" && dmsetup mknodes {CUT_TARGET}")
            snapshot = os.open(f"/dev/mapper/{CUT_TARGET}", os.O_WRONLY)
            torn = {position: cut.torn[i] for position, i in enumerate(cut.kept) if i in cut.torn}
            replay(log, snapshot, sector_bytes, [entries[i] for i in cut.kept], torn)
            os.fsync(snapshot)
            os.close(snapshot)
            sh(f"mount /dev/mapper/{CUT_TARGET} {MOUNT}")
            acked = acked_before(cut.flush)
            with Gateway(binary, grown):
                client = dualpath.Client([address], request_timeout=10.0)
                removed = removed_before(cut.flush)
                present = check(client, size, written, acked, removed, cut.flush)
                del client
            sh(f"umount {MOUNT} && dmsetup remove {CUT_TARGET}")
            checked_acked += len(acked)
            print(
                f"power-loss: cut before entry {cut.flush}/{len(entries)} ({cut.unflushed - cut.dropped} of {cut.unflushed} unflushed writes kept, {len(cut.torn)} torn):"
                f" {len(acked)} acknowledged blocks, {len(removed)} removed, {present} of {len(written)} written present, all whole"
                f" ({time.monotonic() - started:.0f} s)",
                flush=True,
            )
        os.close(device)
    print(f"power-loss: passed: {len(cuts)} power cuts, {checked_acked} acknowledged blocks checked, none lost or torn ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
