//! The control-plane thread that accepts clients on TCP and Unix sockets, does the
//! hello exchange, and hands each connection to the core of the shard it asked
//! for. It never touches a core's state: a channel and a waker are the interface.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use mio::Waker;
use protocol::{decode_header, ErrorCode, Frame, FrameType, NamespaceInfo, HEADER_BYTES, PROTOCOL_VERSION};

use super::connection::Stream;
use super::core::NewConnection;

/// How long a client has to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
const IDLE_SLEEP: Duration = Duration::from_millis(10);

/// The way to one core.
#[derive(Debug)]
pub struct CoreDoor {
    pub sender: Sender<NewConnection>,
    pub waker: Arc<Waker>,
}

#[derive(Debug)]
pub struct Acceptor {
    pub tcp: Option<TcpListener>,
    pub unix: Option<UnixListener>,
    pub cores: Vec<CoreDoor>,
    pub namespaces: Vec<NamespaceInfo>,
    pub shutdown: Arc<AtomicBool>,
}

/// Either kind of accepted socket, blocking, for the hello exchange.
trait HandshakeStream: Read + Write {
    fn set_timeout(&self, timeout: Duration) -> std::io::Result<()>;
}
impl HandshakeStream for TcpStream {
    fn set_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }
}
impl HandshakeStream for UnixStream {
    fn set_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }
}

impl Acceptor {
    pub fn run(self) {
        for listener in self.tcp.iter() {
            listener.set_nonblocking(true).expect("a bound listener can be made non-blocking");
        }
        for listener in self.unix.iter() {
            listener.set_nonblocking(true).expect("a bound listener can be made non-blocking");
        }
        while !self.shutdown.load(Ordering::Relaxed) {
            let mut accepted = false;
            if let Some(listener) = &self.tcp {
                if let Ok((stream, peer)) = listener.accept() {
                    accepted = true;
                    self.admit_tcp(stream, peer.to_string());
                }
            }
            if let Some(listener) = &self.unix {
                if let Ok((stream, _)) = listener.accept() {
                    accepted = true;
                    self.admit_unix(stream);
                }
            }
            if !accepted {
                std::thread::sleep(IDLE_SLEEP);
            }
        }
    }

    fn admit_tcp(&self, stream: TcpStream, peer: String) {
        let prepared = stream.set_nonblocking(false).and_then(|()| stream.set_read_timeout(Some(HELLO_TIMEOUT)));
        let _ = stream.set_nodelay(true);
        let mut handshake = stream;
        let shard = match prepared.map_err(anyhow::Error::from).and_then(|()| self.handshake(&mut handshake)) {
            Ok(shard) => shard,
            Err(error) => return tracing::info!("refused client {peer}: {error:#}"),
        };
        if handshake.set_nonblocking(true).is_err() {
            return;
        }
        self.hand_over(shard, Stream::Tcp(mio::net::TcpStream::from_std(handshake)), peer);
    }

    fn admit_unix(&self, stream: UnixStream) {
        let peer = String::from("unix socket client");
        let prepared = stream.set_nonblocking(false).and_then(|()| stream.set_read_timeout(Some(HELLO_TIMEOUT)));
        let mut handshake = stream;
        let shard = match prepared.map_err(anyhow::Error::from).and_then(|()| self.handshake(&mut handshake)) {
            Ok(shard) => shard,
            Err(error) => return tracing::info!("refused {peer}: {error:#}"),
        };
        if handshake.set_nonblocking(true).is_err() {
            return;
        }
        self.hand_over(shard, Stream::Unix(mio::net::UnixStream::from_std(handshake)), peer);
    }

    fn hand_over(&self, shard: u32, stream: Stream, peer: String) {
        let door = &self.cores[shard as usize];
        if door.sender.send(NewConnection { stream, peer }).is_ok() {
            let _ = door.waker.wake();
        }
    }

    /// Reads the hello, answers it, and returns the shard the client asked for.
    fn handshake(&self, stream: &mut dyn HandshakeStream) -> anyhow::Result<u32> {
        let mut header = [0u8; HEADER_BYTES];
        stream.read_exact(&mut header)?;
        let header = match decode_header(&header) {
            Ok(header) if header.kind == FrameType::Hello => header,
            Ok(header) => return refuse(stream, ErrorCode::BadFrame, format!("expected a Hello frame first, got {:?}", header.kind)),
            Err(error) => return refuse(stream, ErrorCode::BadFrame, error.to_string()),
        };
        let mut body = vec![0u8; header.body_len as usize];
        stream.read_exact(&mut body)?;
        let (version, shard) = match Frame::decode(FrameType::Hello, &body) {
            Ok(Frame::Hello { version, shard, .. }) => (version, shard),
            Ok(_) => unreachable!("decoded as Hello"),
            Err(error) => return refuse(stream, ErrorCode::BadFrame, error.to_string()),
        };
        if version != PROTOCOL_VERSION {
            let message = format!("this gateway speaks protocol version {PROTOCOL_VERSION}, the client {version}; upgrade one of them");
            return refuse(stream, ErrorCode::UnsupportedVersion, message);
        }
        let shard_count = u32::try_from(self.cores.len()).expect("cores bounded by config");
        if shard >= shard_count {
            return refuse(stream, ErrorCode::BadRequest, format!("shard {shard} does not exist; this gateway has {shard_count}"));
        }
        let reply = Frame::HelloOk { version: PROTOCOL_VERSION, shard, shard_count, namespaces: self.namespaces.clone() };
        stream.write_all(&reply.encode())?;
        Ok(shard)
    }
}

/// Answers with an error frame, then reads what the client still sends for a
/// moment: closing with unread input would reset the connection and could discard
/// the answer before the client reads it.
fn refuse(stream: &mut dyn HandshakeStream, code: ErrorCode, message: String) -> anyhow::Result<u32> {
    let _ = stream.write_all(&Frame::Error { request_id: 0, code, message: message.clone() }.encode());
    let mut sink = [0u8; 4096];
    let linger = Duration::from_millis(200);
    let _ = stream.set_timeout(linger);
    let deadline = std::time::Instant::now() + linger;
    while std::time::Instant::now() < deadline {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    bail!("{message}")
}
