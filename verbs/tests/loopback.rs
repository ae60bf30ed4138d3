//! Two queue pairs on the one device, connected to each other: an RDMA WRITE
//! lands in the peer's region, a SEND after it arrives after it, a write
//! outside the peer's region fails with a remote access error. Runs on real
//! verbs (Soft-RoCE in `scripts/test-rdma.sh`); without a device it says so and
//! checks nothing else.

use std::time::{Duration, Instant};
use verbs::{Completion, QueueChannels, RdmaOp, Sge, Verbs};

fn wait(queue: &mut verbs::CompletionQueue, count: usize) -> Vec<Completion> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut out = Vec::new();
    while out.len() < count {
        let missing = count - out.len();
        queue.poll(&mut out, missing).expect("poll");
        assert!(
            Instant::now() < deadline,
            "completions did not arrive within 10 s"
        );
    }
    out
}

#[test]
fn write_then_send_arrive_in_order_and_out_of_region_writes_fail() {
    let Some(verbs) = Verbs::open_for_test() else {
        return;
    };
    let mut source = vec![0u8; 1 << 20];
    for (index, byte) in source.iter_mut().enumerate() {
        *byte = (index * 7 % 251) as u8;
    }
    let mut target = vec![0u8; 1 << 20];
    let mut inbox = vec![0u8; 4096];
    // SAFETY: the vectors outlive the regions (dropped at the end of the test,
    // after the regions and queue pairs, which are declared later).
    let (source_mr, target_mr, inbox_mr) = unsafe {
        (
            verbs
                .register(source.as_mut_ptr(), source.len(), false)
                .expect("register source"),
            verbs
                .register(target.as_mut_ptr(), target.len(), true)
                .expect("register target"),
            verbs
                .register(inbox.as_mut_ptr(), inbox.len(), false)
                .expect("register inbox"),
        )
    };
    let mut writer = verbs
        .queue_pair(64, 1, 128, QueueChannels::default())
        .expect("writer qp");
    let mut reader = verbs
        .queue_pair(
            1,
            16,
            0,
            QueueChannels {
                send: false,
                receive: true,
            },
        )
        .expect("reader qp");
    eprintln!("max inline granted: {}", writer.max_inline());
    let (writer_end, reader_end) = (writer.endpoint(), reader.endpoint());
    writer.connect_to(&reader_end).expect("connect writer");
    reader.connect_to(&writer_end).expect("connect reader");
    // SAFETY: `inbox` is registered and untouched until the receive completes.
    unsafe {
        reader.receive(
            9,
            Sge {
                address: inbox_mr.address(),
                len: 4096,
                lkey: inbox_mr.lkey(),
            },
        )
    }
    .expect("post recv");
    let half = (source.len() / 2) as u32;
    let pieces = [
        Sge {
            address: source_mr.address(),
            len: half,
            lkey: source_mr.lkey(),
        },
        Sge {
            address: source_mr.address() + u64::from(half),
            len: half,
            lkey: source_mr.lkey(),
        },
    ];
    // SAFETY: `source` is registered and unchanged until the completion below;
    // the remote range is the whole target region.
    unsafe {
        writer.post_rdma(
            RdmaOp::Write,
            1,
            &pieces,
            target_mr.address(),
            target_mr.rkey(),
            false,
        )
    }
    .expect("post write");
    writer
        .send_inline(2, b"layer 0 done", true)
        .expect("post send");
    let sent = wait(writer.send_queue(), 1);
    assert!(sent[0].ok, "send: {}", sent[0].status_text);
    let received = wait(reader.recv_queue(), 1);
    assert!(received[0].ok && received[0].is_receive && received[0].byte_len == 12);
    assert_eq!(&inbox[..12], b"layer 0 done");
    assert!(
        target == source,
        "the write landed before the send that followed it"
    );
    // One byte past the end of the peer's region: refused by the peer's NIC.
    // SAFETY: local memory registered; the remote range is deliberately outside.
    unsafe {
        writer.post_rdma(
            RdmaOp::Write,
            3,
            &pieces[..1],
            target_mr.address() + target_mr.len() as u64 - 8,
            target_mr.rkey(),
            true,
        )
    }
    .expect("post");
    let failed = wait(writer.send_queue(), 1);
    assert!(!failed[0].ok, "an out-of-region write must fail");
    eprintln!("out-of-region write: {}", failed[0].status_text);
}

/// GPUDirect RDMA registers GPU memory through a dma-buf. Soft-RoCE has no
/// dma-buf support: the registration must fail with an error the client
/// recognises as "unsupported" (it then stages in host memory), not crash.
/// The fd is a plain file, not a dma-buf: a device that supports dma-buf
/// registration refuses it too, with another error.
#[test]
fn dmabuf_registration_fails_cleanly_where_the_device_lacks_it() {
    let Some(verbs) = Verbs::open_for_test() else {
        return;
    };
    let file = tempfile_fd();
    use std::os::fd::AsFd;
    // SAFETY: nothing is registered (the call fails); had it succeeded, the
    // file outlives the region (dropped at the end of the test, after it).
    let result = unsafe { verbs.register_dmabuf(file.as_fd(), 0, 1 << 20, 0x10_0000, true) };
    let error = result.expect_err("a plain file is not a dma-buf");
    let text = error.to_string();
    assert!(text.contains("ibv_reg_dmabuf_mr"), "{text}");
    if verbs.device_name().starts_with("rxe") {
        assert!(
            error.is_unsupported(),
            "Soft-RoCE has no dma-buf registration: {text}"
        );
    }
    eprintln!("{}: {text}", verbs.device_name());
}

fn tempfile_fd() -> std::fs::File {
    let path = std::env::temp_dir().join(format!("dualpath-dmabuf-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("temporary file");
    file.set_len(1 << 20).expect("size the file");
    std::fs::remove_file(&path).expect("unlink the file");
    file
}

/// Queue pairs carry the class of service asked for (DSCP 26 with ECN, as
/// RoCE deployments mark lossless traffic), as the device reports it back, and
/// an RDMA WRITE still lands; the service level (3) is checked on InfiniBand
/// only (RoCE carries none); one beyond 15 is refused up front.
#[test]
fn queue_pairs_carry_the_service_class_asked_for() {
    let Some(verbs) = Verbs::open_for_test() else {
        return;
    };
    let class = verbs::ServiceClass {
        traffic_class: 26 << 2 | 2,
        service_level: 3,
    };
    let error = verbs
        .clone()
        .with_service_class(verbs::ServiceClass {
            service_level: 16,
            ..class
        })
        .expect_err("16 is not a service level");
    assert!(error.to_string().contains("above 15"), "{error}");
    let verbs = verbs.with_service_class(class).expect("a valid class");
    let mut source = vec![0x5Au8; 64 << 10];
    let mut target = vec![0u8; 64 << 10];
    // SAFETY: the vectors outlive the regions and queue pairs (declared later,
    // dropped first).
    let (source_mr, target_mr) = unsafe {
        (
            verbs
                .register(source.as_mut_ptr(), source.len(), false)
                .expect("register source"),
            verbs
                .register(target.as_mut_ptr(), target.len(), true)
                .expect("register target"),
        )
    };
    let mut writer = verbs
        .queue_pair(4, 1, 0, QueueChannels::default())
        .expect("writer qp");
    let mut reader = verbs
        .queue_pair(1, 1, 0, QueueChannels::default())
        .expect("reader qp");
    let (writer_end, reader_end) = (writer.endpoint(), reader.endpoint());
    writer.connect_to(&reader_end).expect("connect writer");
    reader.connect_to(&writer_end).expect("connect reader");
    for queue_pair in [&writer, &reader] {
        let held = queue_pair.service_class().expect("query the queue pair");
        assert_eq!(held.traffic_class, class.traffic_class);
        if verbs.is_infiniband() {
            assert_eq!(held.service_level, class.service_level);
        } else {
            eprintln!(
                "Ethernet link layer (RoCE): the device keeps service level {}, not {} (none is carried)",
                held.service_level, class.service_level
            );
        }
    }
    let piece = Sge {
        address: source_mr.address(),
        len: source.len() as u32,
        lkey: source_mr.lkey(),
    };
    // SAFETY: `source` is registered and unchanged until the completion below;
    // the remote range is `target`'s region.
    unsafe {
        writer.post_rdma(
            RdmaOp::Write,
            1,
            &[piece],
            target_mr.address(),
            target_mr.rkey(),
            true,
        )
    }
    .expect("post write");
    let done = wait(writer.send_queue(), 1);
    assert!(done[0].ok, "{}", done[0].status_text);
    drop((writer, reader, source_mr, target_mr));
    assert!(target.iter().all(|byte| *byte == 0x5A));
}

/// RDMA READ: 64 reads of 16 KiB posted at once (more than the queue pairs'
/// outstanding-read limit, which the NIC queues behind) bring the peer's
/// region into local memory exactly; a region registered without remote
/// access cannot be read (remote access error).
#[test]
fn reads_bring_the_peers_memory_and_unreadable_regions_fail() {
    let Some(verbs) = Verbs::open_for_test() else {
        return;
    };
    let piece_bytes = 16usize << 10;
    let pieces = 64;
    let mut remote: Vec<u8> = (0..piece_bytes * pieces)
        .map(|index| (index * 13 % 241) as u8)
        .collect();
    let mut private = vec![7u8; 4096];
    let mut local = vec![0u8; piece_bytes * pieces];
    // SAFETY: the vectors outlive the regions and queue pairs (declared later,
    // dropped first).
    let (remote_mr, private_mr, local_mr) = unsafe {
        (
            verbs
                .register(remote.as_mut_ptr(), remote.len(), true)
                .expect("register the readable region"),
            verbs
                .register(private.as_mut_ptr(), private.len(), false)
                .expect("register the private region"),
            verbs
                .register(local.as_mut_ptr(), local.len(), false)
                .expect("register the read target"),
        )
    };
    let mut reader = verbs
        .queue_pair(128, 1, 0, QueueChannels::default())
        .expect("reader qp");
    let mut owner = verbs
        .queue_pair(1, 1, 0, QueueChannels::default())
        .expect("owner qp");
    let (reader_end, owner_end) = (reader.endpoint(), owner.endpoint());
    reader.connect_to(&owner_end).expect("connect reader");
    owner.connect_to(&reader_end).expect("connect owner");
    // Backwards, so a read that landed at the wrong place shows.
    for index in (0..pieces).rev() {
        let offset = (index * piece_bytes) as u64;
        let sge = Sge {
            address: local_mr.address() + offset,
            len: piece_bytes as u32,
            lkey: local_mr.lkey(),
        };
        let last = index == 0;
        // SAFETY: `local` is registered and untouched by Rust until the
        // completion of the last (signalled) read is polled below; the remote
        // range lies inside `remote`'s region.
        unsafe {
            reader.post_rdma(
                RdmaOp::Read,
                u64::from(last),
                &[sge],
                remote_mr.address() + offset,
                remote_mr.rkey(),
                last,
            )
        }
        .expect("post read");
    }
    let done = wait(reader.send_queue(), 1);
    assert!(done[0].ok && done[0].wr_id == 1, "{}", done[0].status_text);
    assert!(local == remote, "every read landed where it was aimed");

    let target = Sge {
        address: local_mr.address(),
        len: 4096,
        lkey: local_mr.lkey(),
    };
    // SAFETY: local memory registered and not touched until the completion;
    // the remote range is deliberately one the peer does not allow.
    unsafe {
        reader.post_rdma(
            RdmaOp::Read,
            2,
            &[target],
            private_mr.address(),
            private_mr.rkey(),
            true,
        )
    }
    .expect("post read");
    let refused = wait(reader.send_queue(), 1);
    assert!(
        !refused[0].ok,
        "a region registered without remote access must not be readable"
    );
    eprintln!("read of a private region: {}", refused[0].status_text);
    drop((reader, owner, remote_mr, private_mr, local_mr));
    assert!(private.iter().all(|byte| *byte == 7));
}
