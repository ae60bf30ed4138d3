//! The receive side of TCP, TLS and Unix connections: a few threads for all
//! of the process's connections, not one a connection (an engine talks to
//! every shard of every gateway). Each thread waits on its connections'
//! sockets together (`mio`) and takes what has arrived without blocking
//! (`recv` with `MSG_DONTWAIT`: the sockets stay blocking for the writers
//! that share them), frame by frame, until the socket has nothing more; a
//! payload goes straight into the engine's memory as over a connection's own
//! thread. Over TLS the session decrypts what the socket had, and the
//! connection is taken until the session holds no more plaintext either (its
//! readiness is the socket's, which does not show what the session holds);
//! the payload is copied out of the session. Plain connections over RDMA
//! keep a thread of their own, which waits on the queue pair and the socket
//! together; a TLS socket over RDMA comes here.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use protocol::{decode_data_prefix, decode_header, Frame, Header, DATA_PREFIX_BYTES, HEADER_BYTES};

use crate::link::{dispatch, end_link, LinkShared, Socket};
use crate::tls::TlsSession;
use crate::Region;

/// Receive threads when `DUALPATH_RECEIVE_THREADS` does not say: one a core,
/// at most this many (a thread takes in several GB/s; an engine's gateways
/// over TCP rarely deliver more).
const DEFAULT_THREADS_MAX: usize = 4;
const WAKE: Token = Token(usize::MAX);

thread_local! {
    /// Set on receive threads: a connection dropped here does not wait for
    /// its own end (this thread would be the one to end it).
    static ON_RECEIVE_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the caller is a receive thread of the pool.
pub(crate) fn on_receive_thread() -> bool {
    ON_RECEIVE_THREAD.with(std::cell::Cell::get)
}

/// The way to one receive thread: connections handed to it wait here until
/// it wakes.
struct Door {
    incoming: Mutex<Vec<(Socket, Arc<LinkShared>)>>,
    waker: Waker,
    /// Connections the thread serves (or has been handed): a new one goes
    /// to the thread with the fewest, so that one client's connections
    /// spread over the threads.
    serving: std::sync::atomic::AtomicUsize,
    /// The thread has stopped (its poll failed): it takes no connection.
    stopped: std::sync::atomic::AtomicBool,
}

struct Pool {
    doors: Vec<Door>,
}

static POOL: OnceLock<Result<Pool, String>> = OnceLock::new();

/// Hands a connection's read side to a receive thread, which receives every
/// frame the gateway sends on it until it ends; then the link's `closed` is
/// set (after the last byte that thread wrote into a region).
pub(crate) fn serve(socket: Socket, shared: Arc<LinkShared>) -> io::Result<()> {
    let pool = POOL
        .get_or_init(|| start(threads_wanted()))
        .as_ref()
        .map_err(|message| io::Error::other(message.clone()))?;
    let door = pool
        .doors
        .iter()
        .filter(|door| !door.stopped.load(std::sync::atomic::Ordering::Acquire))
        .min_by_key(|door| door.serving.load(std::sync::atomic::Ordering::Relaxed))
        .ok_or_else(|| {
            io::Error::other("every receive thread of the client has stopped (see its log)")
        })?;
    door.serving
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    door.incoming
        .lock()
        .expect("receive door lock")
        .push((socket, shared));
    door.waker.wake()
}

/// Whether plain connections share the receive threads: not when
/// `DUALPATH_RECEIVE_THREADS=0`, which gives each its own thread (as before
/// the pool; for comparing the two).
pub(crate) fn pooled() -> bool {
    configured_threads() != Some(0)
}

fn configured_threads() -> Option<usize> {
    std::env::var("DUALPATH_RECEIVE_THREADS")
        .ok()
        .and_then(|value| value.parse::<usize>().ok())
}

fn threads_wanted() -> usize {
    configured_threads()
        .filter(|&threads| threads > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, std::num::NonZeroUsize::get)
                .min(DEFAULT_THREADS_MAX)
        })
}

fn start(threads: usize) -> Result<Pool, String> {
    let mut doors = Vec::with_capacity(threads);
    for index in 0..threads {
        let poll =
            Poll::new().map_err(|error| format!("cannot start a receive thread: {error}"))?;
        let waker = Waker::new(poll.registry(), WAKE)
            .map_err(|error| format!("cannot start a receive thread: {error}"))?;
        doors.push(Door {
            incoming: Mutex::new(Vec::new()),
            waker,
            serving: std::sync::atomic::AtomicUsize::new(0),
            stopped: std::sync::atomic::AtomicBool::new(false),
        });
        std::thread::Builder::new()
            .name(format!("dualpath-rx-{index}"))
            .spawn(move || run(poll, index))
            .map_err(|error| format!("cannot start a receive thread: {error}"))?;
    }
    Ok(Pool { doors })
}

/// Receive thread `index`'s door (called on that thread, once the pool runs).
fn door(index: usize) -> &'static Door {
    &POOL
        .get()
        .expect("the pool runs")
        .as_ref()
        .expect("the pool runs")
        .doors[index]
}

/// Where a connection's next bytes go.
enum Expect {
    Header,
    DataPrefix(Header),
    /// A payload: the rest of it, straight into the region.
    Payload {
        region: Arc<Region>,
        offset: u64,
        left: u64,
    },
    Body(Header),
}

/// One connection on a receive thread.
struct Link {
    /// Holds `fd` open while the thread receives on it.
    _socket: Socket,
    fd: RawFd,
    /// The connection's TLS session: what arrives is read through it.
    tls: Option<Arc<TlsSession>>,
    shared: Arc<LinkShared>,
    expect: Expect,
    /// The header, data prefix or control body being received, and how much
    /// of it is in (reused: a notice per block must not allocate).
    partial: Vec<u8>,
    got: usize,
}

fn run(mut poll: Poll, index: usize) {
    ON_RECEIVE_THREAD.with(|flag| flag.set(true));
    let mut events = Events::with_capacity(256);
    let mut links: Vec<Option<Link>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    // Connections with something to take, this turn (reused).
    let mut ready: Vec<usize> = Vec::new();
    loop {
        if let Err(error) = poll.poll(&mut events, None) {
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // Nothing on this thread can be received any more: end its
            // connections (their engines see why), and take no more.
            let reason = format!("the client's receive thread failed: {error}");
            door(index)
                .stopped
                .store(true, std::sync::atomic::Ordering::Release);
            let handed =
                std::mem::take(&mut *door(index).incoming.lock().expect("receive door lock"));
            for shared in links
                .drain(..)
                .flatten()
                .map(|link| link.shared)
                .chain(handed.into_iter().map(|(_, shared)| shared))
            {
                end_link(&shared, &reason);
            }
            tracing::error!("{reason}");
            return;
        }
        ready.clear();
        for event in &events {
            if event.token() == WAKE {
                let incoming =
                    std::mem::take(&mut *door(index).incoming.lock().expect("receive door lock"));
                for (socket, shared) in incoming {
                    let slot = free.pop().unwrap_or_else(|| {
                        links.push(None);
                        links.len() - 1
                    });
                    let fd = socket.as_fd().as_raw_fd();
                    let tls = socket.tls_session();
                    if let Err(error) = poll.registry().register(
                        &mut SourceFd(&fd),
                        Token(slot),
                        Interest::READABLE,
                    ) {
                        end_link(&shared, &format!("cannot wait on the connection: {error}"));
                        door(index)
                            .serving
                            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                        free.push(slot);
                        continue;
                    }
                    links[slot] = Some(Link {
                        _socket: socket,
                        fd,
                        tls,
                        shared,
                        expect: Expect::Header,
                        partial: Vec::with_capacity(256),
                        got: 0,
                    });
                    // Bytes that came before it was registered.
                    ready.push(slot);
                }
            } else {
                ready.push(event.token().0);
            }
        }
        for &slot in &ready {
            let Some(link) = links.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if let Err(reason) = receive_ready(link) {
                let link = links[slot].take().expect("looked up above");
                let _ = poll.registry().deregister(&mut SourceFd(&link.fd));
                end_link(&link.shared, &reason);
                door(index)
                    .serving
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                free.push(slot);
            }
        }
    }
}

/// Takes everything that has arrived on `link`; `Err` with the reason once
/// the connection has ended.
fn receive_ready(link: &mut Link) -> Result<(), String> {
    loop {
        match step(link) {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
                return Err("the gateway closed the connection".into())
            }
            Err(error) => return Err(error.to_string()),
        }
    }
}

/// Receives what the connection expects next; `false` when nothing more
/// has arrived for now.
fn step(link: &mut Link) -> io::Result<bool> {
    let (fd, tls) = (link.fd, link.tls.as_deref());
    let take_now = |buffer: &mut [u8]| match tls {
        Some(session) => session.receive_now(fd, buffer),
        None => recv_now(fd, buffer),
    };
    match &mut link.expect {
        Expect::Payload {
            region,
            offset,
            left,
        } => {
            let received = region
                .fill(*offset, *left, take_now)
                .ok_or_else(|| invalid("a payload outside its region"))?;
            let Some(count) = received? else {
                return Ok(false);
            };
            *offset += count as u64;
            *left -= count as u64;
            if *left == 0 {
                link.expect = Expect::Header;
            }
            Ok(true)
        }
        _ => {
            let want = match &link.expect {
                Expect::Header => HEADER_BYTES,
                Expect::DataPrefix(_) => DATA_PREFIX_BYTES,
                Expect::Body(header) => header.body_len as usize,
                Expect::Payload { .. } => unreachable!("handled above"),
            };
            link.partial.resize(want, 0);
            if link.got < want {
                let Some(count) = take_now(&mut link.partial[link.got..want])? else {
                    return Ok(false);
                };
                link.got += count;
                if link.got < want {
                    return Ok(true);
                }
            }
            link.got = 0;
            complete(link)?;
            Ok(true)
        }
    }
}

/// A header, data prefix or control body is in whole: decide what comes next.
fn complete(link: &mut Link) -> io::Result<()> {
    link.expect = match std::mem::replace(&mut link.expect, Expect::Header) {
        Expect::Header => {
            let bytes: [u8; HEADER_BYTES] = link.partial[..HEADER_BYTES]
                .try_into()
                .expect("a whole header");
            let header = decode_header(&bytes).map_err(invalid)?;
            if header.kind == protocol::FrameType::Data {
                Expect::DataPrefix(header)
            } else if header.body_len == 0 {
                let frame = Frame::decode(header.kind, &[]).map_err(invalid)?;
                dispatch(frame, &link.shared)?;
                Expect::Header
            } else {
                Expect::Body(header)
            }
        }
        Expect::DataPrefix(header) => {
            let bytes: &[u8; DATA_PREFIX_BYTES] = link.partial[..DATA_PREFIX_BYTES]
                .try_into()
                .expect("a whole prefix");
            let prefix = decode_data_prefix(header.body_len, bytes).map_err(invalid)?;
            let region = link
                .shared
                .region(prefix.region_id)
                .ok_or_else(|| invalid(format!("data for unknown region {}", prefix.region_id)))?;
            region.check_receive(prefix.offset, prefix.len)?;
            if prefix.len == 0 {
                Expect::Header
            } else {
                Expect::Payload {
                    region,
                    offset: prefix.offset,
                    left: u64::from(prefix.len),
                }
            }
        }
        Expect::Body(header) => {
            let frame = Frame::decode(header.kind, &link.partial).map_err(invalid);
            // A rare big frame (a long pool status) does not keep its memory.
            if link.partial.capacity() > 64 << 10 {
                link.partial = Vec::with_capacity(256);
            }
            dispatch(frame?, &link.shared)?;
            Expect::Header
        }
        Expect::Payload { .. } => unreachable!("payloads complete in `step`"),
    };
    Ok(())
}

/// `recv` without blocking: `None` when nothing has arrived; an end of the
/// connection is `UnexpectedEof`.
fn recv_now(fd: RawFd, buffer: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        match nix::sys::socket::recv(fd, buffer, nix::sys::socket::MsgFlags::MSG_DONTWAIT) {
            Ok(0) if !buffer.is_empty() => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the gateway closed the connection",
                ))
            }
            Ok(count) => return Ok(Some(count)),
            Err(nix::errno::Errno::EAGAIN) => return Ok(None),
            Err(nix::errno::Errno::EINTR) => {}
            Err(errno) => return Err(io::Error::from(errno)),
        }
    }
}

fn invalid(error: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error.to_string())
}
