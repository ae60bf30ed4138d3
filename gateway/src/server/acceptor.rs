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
use protocol::auth::AccessGrant;
use protocol::auth::{self, NONCE_BYTES};
use protocol::{
    decode_header, ErrorCode, Frame, FrameType, NamespaceInfo, HEADER_BYTES, PROTOCOL_VERSION,
};

use super::metrics::AcceptorCounters;

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
    /// The cluster secret clients must prove; `None`: no authentication.
    pub secret: Option<Arc<[u8]>>,
    /// TLS for TCP clients; `None`: plain TCP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub counters: Arc<AcceptorCounters>,
    /// DSCP marked on accepted TCP connections; 0: unmarked.
    pub tcp_dscp: u8,
}

impl std::fmt::Debug for super::metrics::AcceptorCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcceptorCounters").finish_non_exhaustive()
    }
}

/// Either kind of accepted socket, blocking, for the hello exchange.
trait HandshakeStream: Read + Write {
    fn set_timeout(&self, timeout: Duration) -> std::io::Result<()>;
}
impl HandshakeStream for rustls::StreamOwned<rustls::ServerConnection, TcpStream> {
    fn set_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        self.sock.set_read_timeout(Some(timeout))
    }
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
            listener
                .set_nonblocking(true)
                .expect("a bound listener can be made non-blocking");
        }
        for listener in self.unix.iter() {
            listener
                .set_nonblocking(true)
                .expect("a bound listener can be made non-blocking");
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
        let prepared = stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(HELLO_TIMEOUT)));
        let _ = stream.set_nodelay(true);
        if self.tcp_dscp != 0 {
            if let Err(error) = client::mark_dscp(&stream, self.tcp_dscp) {
                tracing::warn!(
                    "cannot mark the connection from {peer} with DSCP {}: {error}",
                    self.tcp_dscp
                );
            }
        }
        if let Some(tls) = &self.tls {
            if let Err(error) = prepared {
                return tracing::info!("refused client {peer}: {error}");
            }
            return self.admit_tls(stream, peer, Arc::clone(tls));
        }
        let mut handshake = stream;
        let (shard, access) = match prepared
            .map_err(anyhow::Error::from)
            .and_then(|()| self.handshake(&mut handshake))
        {
            Ok(admitted) => admitted,
            Err(error) => return tracing::info!("refused client {peer}: {error:#}"),
        };
        if handshake.set_nonblocking(true).is_err() {
            return;
        }
        self.hand_over(
            shard,
            Stream::Tcp(mio::net::TcpStream::from_std(handshake)),
            peer,
            access,
        );
    }

    /// The TLS handshake and the hello inside it; then the session goes to the
    /// core, non-blocking.
    fn admit_tls(&self, stream: TcpStream, peer: String, config: Arc<rustls::ServerConfig>) {
        let session = match rustls::ServerConnection::new(config) {
            Ok(session) => session,
            Err(error) => return tracing::warn!("cannot start TLS for {peer}: {error}"),
        };
        let mut tls = rustls::StreamOwned::new(session, stream);
        let (shard, access) = match self.handshake(&mut tls) {
            Ok(admitted) => admitted,
            Err(error) => {
                if tls.conn.is_handshaking() {
                    self.counters.tls_failures.fetch_add(1, Ordering::Relaxed);
                }
                return tracing::info!("refused TLS client {peer}: {error:#}");
            }
        };
        let rustls::StreamOwned { conn, sock } = tls;
        if sock.set_nonblocking(true).is_err() {
            return;
        }
        let session = super::tls::TlsSession::new(conn, sock);
        self.hand_over(
            shard,
            Stream::Tls(Arc::new(std::sync::Mutex::new(session))),
            peer,
            access,
        );
    }

    fn admit_unix(&self, stream: UnixStream) {
        let peer = String::from("unix socket client");
        let prepared = stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(HELLO_TIMEOUT)));
        let mut handshake = stream;
        let (shard, access) = match prepared
            .map_err(anyhow::Error::from)
            .and_then(|()| self.handshake(&mut handshake))
        {
            Ok(admitted) => admitted,
            Err(error) => return tracing::info!("refused {peer}: {error:#}"),
        };
        if handshake.set_nonblocking(true).is_err() {
            return;
        }
        self.hand_over(
            shard,
            Stream::Unix(mio::net::UnixStream::from_std(handshake)),
            peer,
            access,
        );
    }

    fn hand_over(&self, shard: u32, stream: Stream, peer: String, access: Arc<AccessGrant>) {
        let door = &self.cores[shard as usize];
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        if door
            .sender
            .send(NewConnection {
                stream,
                peer,
                access,
            })
            .is_ok()
        {
            let _ = door.waker.wake();
        }
    }

    /// Reads the hello, checks the client's proof of the secret (or of its
    /// token's key), answers, and returns the shard the client asked for and what
    /// it may do.
    fn handshake(
        &self,
        stream: &mut dyn HandshakeStream,
    ) -> anyhow::Result<(u32, Arc<AccessGrant>)> {
        let (version, shard, client_nonce) = match read_frame(stream, FrameType::Hello)? {
            Ok(Frame::Hello {
                version,
                shard,
                token,
            }) => (version, shard, token),
            Ok(_) => unreachable!("read as Hello"),
            Err(message) => return refuse(stream, ErrorCode::BadFrame, message),
        };
        if version != PROTOCOL_VERSION {
            let message = format!("this gateway speaks protocol version {PROTOCOL_VERSION}, the client {version}; upgrade one of them");
            return refuse(stream, ErrorCode::UnsupportedVersion, message);
        }
        let shard_count = u32::try_from(self.cores.len()).expect("cores bounded by config");
        if shard >= shard_count {
            return refuse(
                stream,
                ErrorCode::BadRequest,
                format!("shard {shard} does not exist; this gateway has {shard_count}"),
            );
        }
        let mut access = AccessGrant::everything();
        if let Some(secret) = &self.secret {
            let authenticated = self
                .authenticate(stream, secret, &client_nonce, shard)?
                .and_then(|grant| {
                    grant.check_expiry(super::core::unix_now())?;
                    Ok(grant)
                });
            match authenticated {
                Ok(grant) => access = grant,
                Err(message) => {
                    self.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
                    return refuse(stream, ErrorCode::Unauthorized, message);
                }
            }
        }
        let reply = Frame::HelloOk {
            version: PROTOCOL_VERSION,
            shard,
            shard_count,
            namespaces: self.namespaces.clone(),
        };
        stream.write_all(&reply.encode())?;
        Ok((shard, Arc::new(access)))
    }
}

/// Answers with an error frame, then reads what the client still sends for a
/// moment: closing with unread input would reset the connection and could discard
/// the answer before the client reads it.
impl Acceptor {
    /// Challenge-response: sends a fresh nonce, checks the client's proof. The
    /// hello's token field is the client's nonce, then (for a token holder) the
    /// token's grant, whose key the proof must use. The inner `Err` is the
    /// refusal to send.
    fn authenticate(
        &self,
        stream: &mut dyn HandshakeStream,
        secret: &[u8],
        hello_token: &[u8],
        shard: u32,
    ) -> anyhow::Result<Result<AccessGrant, String>> {
        let (client_nonce, grant_body) = hello_token.split_at(hello_token.len().min(NONCE_BYTES));
        let (key, grant) = if grant_body.is_empty() {
            (secret.to_vec(), AccessGrant::everything())
        } else {
            match AccessGrant::decode(grant_body) {
                Ok(grant) => (auth::token_key(secret, grant_body), grant),
                Err(problem) => {
                    return Ok(Err(format!("the client's token is malformed: {problem}")))
                }
            }
        };
        if client_nonce.len() != NONCE_BYTES {
            return Ok(Err(
                "this gateway requires authentication: give the client the cluster secret".into(),
            ));
        }
        let mut server_nonce = [0u8; NONCE_BYTES];
        getrandom::getrandom(&mut server_nonce)
            .map_err(|error| anyhow::anyhow!("no randomness for a nonce: {error}"))?;
        stream.write_all(
            &Frame::Challenge {
                nonce: server_nonce.to_vec(),
            }
            .encode(),
        )?;
        let mac = match read_frame(stream, FrameType::Proof)? {
            Ok(Frame::Proof { mac }) => mac,
            Ok(_) => unreachable!("read as Proof"),
            Err(message) => return Ok(Err(message)),
        };
        if !auth::verify(&key, client_nonce, &server_nonce, shard, &mac) {
            return Ok(Err(if grant_body.is_empty() {
                "authentication failed: the client's secret is not this cluster's".into()
            } else {
                format!("authentication failed: the token of {:?} was not issued with this cluster's secret (or was altered)", grant.client)
            }));
        }
        Ok(Ok(grant))
    }
}

/// Reads one control frame of type `kind`; the inner `Err` says what was wrong.
fn read_frame(
    stream: &mut dyn HandshakeStream,
    kind: FrameType,
) -> anyhow::Result<Result<Frame, String>> {
    let mut header = [0u8; HEADER_BYTES];
    stream.read_exact(&mut header)?;
    let header = match decode_header(&header) {
        Ok(header) if header.kind == kind => header,
        Ok(header) => {
            return Ok(Err(format!(
                "expected a {kind:?} frame, got {:?}",
                header.kind
            )))
        }
        Err(error) => return Ok(Err(error.to_string())),
    };
    let mut body = vec![0u8; header.body_len as usize];
    stream.read_exact(&mut body)?;
    Ok(Frame::decode(kind, &body).map_err(|error| error.to_string()))
}

fn refuse(
    stream: &mut dyn HandshakeStream,
    code: ErrorCode,
    message: String,
) -> anyhow::Result<(u32, Arc<AccessGrant>)> {
    let _ = stream.write_all(
        &Frame::Error {
            request_id: 0,
            code,
            message: message.clone(),
        }
        .encode(),
    );
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
