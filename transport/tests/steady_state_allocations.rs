//! The TCP transport on the read path allocates nothing once warm: piece
//! lists, data heads and notice bytes are recycled, and each `writev`'s
//! slices sit on the stack. Counted by `allocation-counter`'s global
//! allocator, on this test's thread, while the measured loop runs.
// Test data is small: narrowing casts here cannot truncate.
#![allow(clippy::cast_possible_truncation)]

use std::rc::Rc;

use protocol::Frame;
use staging::{HugePages, SlabConfig, StagingSlab};
use transport::{RemoteWrite, TcpTransport, Transport};

/// One block read as the gateway sends it: 8 layer pieces of a staging
/// buffer, then the layer and block notices.
fn send_one_read(
    transport: &mut TcpTransport<std::io::Sink>,
    slab: &Rc<StagingSlab>,
    request: u64,
) {
    let buffer = slab.acquire().expect("a free buffer");
    let mut pieces = transport.pieces();
    for layer in 0..8u64 {
        pieces.push((
            layer * 65536 + request * 4096,
            (layer as usize) * 4096..(layer as usize + 1) * 4096,
        ));
    }
    transport.write(RemoteWrite {
        request_id: request,
        region_id: 1,
        buffer,
        pieces,
    });
    transport.notify(&Frame::LayerDone {
        request_id: request,
        layer: 7,
    });
    transport.notify(&Frame::BlockDone {
        request_id: request,
        block_index: 3,
        code: protocol::ErrorCode::Ok,
        message: String::new(),
    });
    while transport.has_pending() {
        transport.progress().expect("a sink takes everything");
    }
}

#[test]
fn sending_block_reads_allocates_nothing_once_warm() {
    let slab = StagingSlab::allocate(SlabConfig {
        slab_bytes: 1 << 20,
        buffer_bytes: 32768,
        huge_pages: HugePages::Off,
    })
    .expect("slab");
    let mut transport = TcpTransport::new(std::io::sink());
    for request in 0..16 {
        send_one_read(&mut transport, &slab, request);
    }
    let allocations = allocation_counter::measure(|| {
        for request in 16..1016 {
            send_one_read(&mut transport, &slab, request);
        }
    })
    .count_total;
    assert_eq!(
        allocations, 0,
        "{allocations} allocations for 1,000 block reads sent once warm"
    );
    assert_eq!(
        slab.buffers_in_use(),
        0,
        "every buffer went back to the slab"
    );
}
