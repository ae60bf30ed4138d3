//! RDMA READs of a client's region into staging buffers (a store taken by
//! read), on real verbs: the gateway's `RdmaTransport` on one queue pair, the
//! client's registered memory behind another on the same device. Runs in
//! `scripts/test-rdma.sh` (Soft-RoCE in a VM); without a device it says so
//! and checks nothing else.
// Test data is small: narrowing casts here cannot truncate.
#![allow(clippy::cast_possible_truncation)]

use std::rc::Rc;
use std::time::{Duration, Instant};

use staging::{HugePages, SlabConfig, StagingSlab};
use transport::verbs::{QueueChannels, Verbs};
use transport::{
    RdmaTransport, RemoteRead, RemoteRegion, SlabRegistration, TcpTransport, Transport,
};

const PIECE: usize = 16 << 10;

/// Ten 16 KiB pieces, from scattered offsets of the client's region into
/// three staging buffers, through a transport whose send queue holds four
/// work requests: posted in three parts, they land exactly where each piece
/// says, the read comes back once, and what was read counts as taken by the
/// client (not as payload sent). A read reaching past the region is refused
/// before anything of it is posted: the transport breaks, and its buffers go
/// back to the slab once it is dropped.
#[test]
fn reads_land_where_each_piece_says_in_parts_and_count_as_taken() {
    let Some(verbs) = Verbs::open_for_test() else {
        return;
    };
    let slab = StagingSlab::allocate(SlabConfig {
        slab_bytes: 1 << 20,
        buffer_bytes: 64 << 10,
        huge_pages: HugePages::Off,
    })
    .expect("slab");
    let registration =
        Rc::new(SlabRegistration::new(&verbs, Rc::clone(&slab)).expect("register the slab"));
    let mut memory: Vec<u8> = (0..256 << 10)
        .map(|index: usize| (index * 31 % 253) as u8)
        .collect();
    // SAFETY: `memory` outlives the registration (declared earlier, dropped
    // later); Rust only reads it while the NIC may.
    let region =
        unsafe { verbs.register(memory.as_mut_ptr(), memory.len(), true) }.expect("region");
    let mut gateway_side = verbs
        .queue_pair(
            4,
            1,
            64,
            QueueChannels {
                send: true,
                receive: false,
            },
        )
        .expect("gateway queue pair");
    let mut client_side = verbs
        .queue_pair(1, 1, 0, QueueChannels::default())
        .expect("client queue pair");
    let (gateway_end, client_end) = (gateway_side.endpoint(), client_side.endpoint());
    gateway_side.connect_to(&client_end).expect("connect");
    client_side.connect_to(&gateway_end).expect("connect");
    let (control, _client_control) = std::os::unix::net::UnixStream::pair().expect("control pair");
    control.set_nonblocking(true).expect("non-blocking");
    let mut transport = RdmaTransport::new(
        gateway_side,
        4,
        Rc::clone(&registration),
        Box::new(TcpTransport::new(control)),
    )
    .expect("transport");
    transport.register_remote_region(
        1,
        RemoteRegion {
            address: region.address(),
            len: memory.len() as u64,
            rkey: region.rkey(),
        },
    );
    let pieces: Vec<(u64, usize, std::ops::Range<usize>)> = (0..10)
        .map(|index: usize| {
            let remote = ((9 - index) * 20_000) as u64;
            let start = index / 3 * PIECE;
            (remote, index % 3, start..start + PIECE)
        })
        .collect();
    let buffers = (0..3)
        .map(|_| slab.acquire().expect("a free buffer"))
        .collect();
    transport
        .read(RemoteRead {
            tag: 7,
            region_id: 1,
            buffers,
            pieces: pieces.clone(),
        })
        .expect("an RDMA transport reads");
    let (mut taken, mut sent) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let read = loop {
        let progress = transport.progress().expect("progress");
        taken += progress.bytes_taken;
        sent += progress.payload_bytes;
        if let Some(read) = transport.take_finished_read() {
            break read;
        }
        assert!(
            Instant::now() < deadline,
            "the read did not finish within 10 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(read.tag, 7);
    assert!(
        transport.take_finished_read().is_none(),
        "a read comes back once"
    );
    for (remote, buffer, range) in &pieces {
        let remote = *remote as usize;
        assert!(
            read.buffers[*buffer].as_slice()[range.clone()] == memory[remote..remote + PIECE],
            "the piece read from offset {remote} landed in buffer {buffer} at {range:?}"
        );
    }
    assert_eq!(taken, 10 * PIECE as u64, "what was read counts as taken");
    assert_eq!(sent, 0, "nothing was sent");
    assert!(read.pieces.is_empty(), "the transport kept the pieces list");
    assert!(
        transport.read_pieces().capacity() >= pieces.len(),
        "the next read's pieces list is the finished one's, not a new allocation"
    );
    drop(read);

    let buffers = vec![slab.acquire().expect("a free buffer")];
    let past_end = vec![(memory.len() as u64 - 100, 0, 0..PIECE)];
    transport
        .read(RemoteRead {
            tag: 8,
            region_id: 1,
            buffers,
            pieces: past_end,
        })
        .expect("queued");
    let error = transport
        .progress()
        .expect_err("a read past the region is refused");
    assert!(error.to_string().contains("outside region 1"), "{error}");
    drop(transport);
    assert_eq!(slab.buffers_in_use(), 0, "every buffer went back");
    drop(region);
}
