//! The control-plane thread that accepts clients on TCP and Unix sockets and
//! the hello exchange that hands each one to the core of the shard it asked
//! for. It never touches a core's state: a channel and a waker are the
//! interface.
//!
//! Each accepted socket's hello (with TLS, its handshake first) runs on a
//! short-lived thread of its own, under one deadline for the whole exchange:
//! a client that connects and sends nothing, or trickles its hello a byte at
//! a time, holds up nobody else and is closed when the deadline passes. At
//! most `MAX_HELLOS` run at once; beyond that, new clients wait in the listen
//! backlog. A failed accept (the open-files limit reached) is logged with the
//! fix, at most once per `ACCEPT_ERROR_LOG_EVERY`, and tried again shortly:
//! the client waits in the backlog meanwhile.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use protocol::auth::AccessGrant;
use protocol::auth::{self, NONCE_BYTES};
use protocol::{
    decode_header, ErrorCode, Frame, FrameType, NamespaceInfo, HEADER_BYTES,
    OLDEST_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

use super::connection::Stream;
use super::core::NewConnection;
use super::fault_log::FaultLog;
use super::metrics::AcceptorCounters;

/// How long a client has for its whole hello exchange (and TLS handshake).
const HELLO_DEADLINE: Duration = Duration::from_secs(5);
/// Hellos in progress at once; more clients wait in the listen backlog.
const MAX_HELLOS: usize = 256;
/// How often the accept loop looks at the shutdown flag, and how soon it
/// tries again after a failed accept.
const ACCEPT_TICK: Duration = Duration::from_millis(100);
const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

const TCP: Token = Token(0);
const UNIX: Token = Token(1);
const HELLO_ENDED: Token = Token(2);

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
    pub shutdown: Arc<AtomicBool>,
    /// Set by SIGHUP: read the TLS files and the configuration file again.
    pub reload: Arc<AtomicBool>,
    /// The configuration file, to read again on SIGHUP (`None`: the gateway
    /// runs on the embedded default).
    pub config_reload: Option<super::reload::ConfigReload>,
    pub admission: Arc<Admission>,
}

/// A client past its hello: the shard it asked for, what it may do, and the
/// protocol version the connection speaks.
#[derive(Debug)]
struct Admitted {
    shard: u32,
    access: Arc<AccessGrant>,
    version: u16,
}

/// What a hello needs, shared by the threads that run them.
#[derive(Debug)]
pub struct Admission {
    pub cores: Vec<CoreDoor>,
    pub namespaces: Vec<NamespaceInfo>,
    /// The cluster secret clients must prove; `None`: no authentication.
    pub secret: Option<Arc<[u8]>>,
    /// TLS for TCP clients; `None`: plain TCP.
    pub tls: Option<super::tls::ReloadableTls>,
    pub counters: Arc<AcceptorCounters>,
    /// DSCP marked on accepted TCP connections; 0: unmarked.
    pub tcp_dscp: u8,
    /// TCP clients whose host stops answering are closed after about this
    /// long (`gateway.dead_client_timeout_ms`); `None`: never.
    pub dead_client_timeout: Option<Duration>,
}

impl std::fmt::Debug for super::metrics::AcceptorCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcceptorCounters").finish_non_exhaustive()
    }
}

/// A freshly accepted socket, before its hello.
enum Accepted {
    Tcp(TcpStream, String),
    Unix(UnixStream),
}

/// Hellos in progress; the last one to end while all were taken wakes the
/// accept loop, which stopped accepting.
#[derive(Debug)]
struct HelloSlots {
    in_progress: AtomicUsize,
    waker: Waker,
}

/// One hello's place among the `MAX_HELLOS`, given back on drop (also when
/// its thread could not start).
struct HelloSlot(Arc<HelloSlots>, Arc<AcceptorCounters>);

impl Drop for HelloSlot {
    fn drop(&mut self) {
        self.1.hellos_in_progress.fetch_sub(1, Ordering::Relaxed);
        if self.0.in_progress.fetch_sub(1, Ordering::AcqRel) == MAX_HELLOS {
            let _ = self.0.waker.wake();
        }
    }
}

impl Acceptor {
    /// Accepts until shutdown; fails only if the poll cannot be set up.
    pub fn run(mut self) -> anyhow::Result<()> {
        let mut poll = Poll::new().context("cannot create the acceptor's poll")?;
        if let Some(listener) = &self.tcp {
            listener.set_nonblocking(true)?;
        }
        if let Some(listener) = &self.unix {
            listener.set_nonblocking(true)?;
        }
        let listeners = [
            (self.tcp.as_ref().map(AsRawFd::as_raw_fd), TCP),
            (self.unix.as_ref().map(AsRawFd::as_raw_fd), UNIX),
        ];
        for (fd, token) in listeners {
            if let Some(fd) = fd {
                poll.registry()
                    .register(&mut SourceFd(&fd), token, Interest::READABLE)?;
            }
        }
        let slots = Arc::new(HelloSlots {
            in_progress: AtomicUsize::new(0),
            waker: Waker::new(poll.registry(), HELLO_ENDED)?,
        });
        let mut events = Events::with_capacity(8);
        let mut errors = FaultLog::new(ACCEPT_ERROR_LOG_EVERY);
        while !self.shutdown.load(Ordering::Relaxed) {
            if self.reload.swap(false, Ordering::Relaxed) {
                self.admission.reload_tls();
                match self.config_reload.as_mut() {
                    Some(config) => config.reload(),
                    None => tracing::info!(
                        "SIGHUP: no configuration file to read again (the gateway runs on the embedded default)"
                    ),
                }
            }
            if let Err(error) = poll.poll(&mut events, Some(ACCEPT_TICK)) {
                if error.kind() != std::io::ErrorKind::Interrupted {
                    return Err(error).context("the acceptor's poll failed");
                }
            }
            // Both listeners every time, events or not: the poll is
            // edge-triggered, and a pass that stopped early (a failed accept,
            // every hello slot taken) left clients in the backlog.
            if let Some(listener) = &self.tcp {
                self.accept_all(&slots, &mut errors, || {
                    let (stream, peer) = listener.accept()?;
                    Ok(Accepted::Tcp(stream, peer.to_string()))
                });
            }
            if let Some(listener) = &self.unix {
                self.accept_all(&slots, &mut errors, || {
                    listener.accept().map(|(stream, _)| Accepted::Unix(stream))
                });
            }
        }
        Ok(())
    }

    /// Accepts until the backlog is empty, every hello slot is taken, or an
    /// accept fails (logged; tried again at the next tick).
    fn accept_all(
        &self,
        slots: &Arc<HelloSlots>,
        errors: &mut FaultLog,
        mut accept: impl FnMut() -> std::io::Result<Accepted>,
    ) {
        while slots.in_progress.load(Ordering::Acquire) < MAX_HELLOS {
            match accept() {
                Ok(accepted) => self.start_hello(slots, accepted),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(error) => {
                    let counters = &self.admission.counters;
                    counters.accept_errors.fetch_add(1, Ordering::Relaxed);
                    if let Some(held_back) = errors.admit("accept", Instant::now()) {
                        tracing::warn!(
                            "cannot accept a client (it waits in the listen backlog): {error}{}{}",
                            accept_error_fix(&error),
                            held_back_note(held_back)
                        );
                    }
                    return;
                }
            }
        }
    }

    /// Runs `accepted`'s hello on a thread of its own.
    fn start_hello(&self, slots: &Arc<HelloSlots>, accepted: Accepted) {
        slots.in_progress.fetch_add(1, Ordering::AcqRel);
        let counters = Arc::clone(&self.admission.counters);
        counters.hellos_in_progress.fetch_add(1, Ordering::Relaxed);
        let slot = HelloSlot(Arc::clone(slots), counters);
        let admission = Arc::clone(&self.admission);
        let started = std::thread::Builder::new()
            .name("dualpath-hello".into())
            .spawn(move || {
                let _slot = slot;
                match accepted {
                    Accepted::Tcp(stream, peer) => admission.admit_tcp(stream, peer),
                    Accepted::Unix(stream) => admission.admit_unix(stream),
                }
            });
        if let Err(error) = started {
            // The closure (with the socket and the slot) was dropped: the
            // client sees its connection closed and dials again.
            tracing::warn!("cannot start a thread for a client's hello: {error}");
        }
    }
}

/// How many lines like this one were held back, when any were.
pub(super) fn held_back_note(held_back: u64) -> String {
    if held_back == 0 {
        String::new()
    } else {
        format!(" ({held_back} more since the last such line)")
    }
}

/// What to do about a failed accept, when there is something.
fn accept_error_fix(error: &std::io::Error) -> String {
    match error.raw_os_error() {
        Some(code) if code == nix::libc::EMFILE => format!(
            ": the gateway has used its open-files limit ({}); raise it (LimitNOFILE= in its systemd unit, `ulimit -n` in its shell): each client holds one connection per core",
            super::open_files_limit().map_or_else(|| "unknown".to_owned(), |limit| limit.to_string())
        ),
        Some(code) if code == nix::libc::ENFILE => {
            ": the system's open-files table is full (fs.file-max)".to_owned()
        }
        _ => String::new(),
    }
}

/// A socket whose reads and writes all end by one deadline: each waits at
/// most until then, and none starts after it. A socket read timeout alone
/// restarts with every byte, which a client trickling its hello extends
/// forever.
pub(super) struct Deadlined<S> {
    socket: S,
    deadline: Instant,
}

/// The blocking sockets a hello runs on.
pub(super) trait TimedSocket: Read + Write {
    fn set_timeouts(&self, timeout: Duration) -> std::io::Result<()>;
}

impl TimedSocket for TcpStream {
    fn set_timeouts(&self, timeout: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(timeout))?;
        self.set_write_timeout(Some(timeout))
    }
}

impl TimedSocket for UnixStream {
    fn set_timeouts(&self, timeout: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(timeout))?;
        self.set_write_timeout(Some(timeout))
    }
}

impl<S: TimedSocket> Deadlined<S> {
    pub(super) fn new(socket: S, within: Duration) -> Self {
        Self {
            socket,
            deadline: Instant::now() + within,
        }
    }

    /// Arms the socket's timeouts with the time left, or fails once none is.
    fn arm(&self) -> std::io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "deadline passed",
            ));
        }
        self.socket.set_timeouts(left)
    }
}

impl<S: TimedSocket> Read for Deadlined<S> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.socket.read(buffer)
    }
}

impl<S: TimedSocket> Write for Deadlined<S> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.socket.write(bytes)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.socket.flush()
    }
}

/// A stream a hello runs over: a deadlined socket, or a TLS session on one.
trait HelloStream: Read + Write {
    /// Brings the deadline forward to `within` from now, if that is sooner.
    fn cut_deadline(&mut self, within: Duration);
}

impl<S: TimedSocket> HelloStream for Deadlined<S> {
    fn cut_deadline(&mut self, within: Duration) {
        self.deadline = self.deadline.min(Instant::now() + within);
    }
}

impl<S: TimedSocket> HelloStream for rustls::StreamOwned<rustls::ServerConnection, Deadlined<S>> {
    fn cut_deadline(&mut self, within: Duration) {
        self.sock.cut_deadline(within);
    }
}

/// Whether a hello failed because the client ran out of time.
fn timed_out(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .any(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            )
        })
}

impl Admission {
    /// SIGHUP: the TLS certificate, key and client CA read again.
    fn reload_tls(&self) {
        let Some(tls) = &self.tls else {
            return tracing::debug!("SIGHUP: no TLS files to read again (TLS is off)");
        };
        match tls.reload() {
            Ok(()) => {
                self.counters.tls_reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    "SIGHUP: TLS certificate reloaded from {}; new connections use it",
                    tls.cert_file().display()
                );
            }
            Err(error) => {
                self.counters
                    .tls_reload_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!("SIGHUP: kept the current TLS certificate: {error:#}");
            }
        }
    }

    fn admit_tcp(&self, stream: TcpStream, peer: String) {
        let _ = stream.set_nodelay(true);
        if let Some(dead_after) = self.dead_client_timeout {
            if let Err(error) = client::end_when_peer_dies(&stream, dead_after) {
                tracing::warn!("cannot turn on TCP keepalive for {peer}: {error}");
            }
        }
        if self.tcp_dscp != 0 {
            if let Err(error) = client::mark_dscp(&stream, self.tcp_dscp) {
                tracing::warn!(
                    "cannot mark the connection from {peer} with DSCP {}: {error}",
                    self.tcp_dscp
                );
            }
        }
        if let Err(error) = stream.set_nonblocking(false) {
            return tracing::info!("refused client {peer}: {error}");
        }
        let socket = Deadlined::new(stream, HELLO_DEADLINE);
        if let Some(tls) = &self.tls {
            return self.admit_tls(socket, peer, tls.current());
        }
        let mut socket = socket;
        let Some(admitted) = self.hello(&mut socket, &peer, "client") else {
            return;
        };
        if socket.socket.set_nonblocking(true).is_err() {
            return;
        }
        self.hand_over(
            admitted,
            Stream::Tcp(mio::net::TcpStream::from_std(socket.socket)),
            peer,
        );
    }

    /// The TLS handshake and the hello inside it; then the session goes to the
    /// core, non-blocking.
    fn admit_tls(
        &self,
        socket: Deadlined<TcpStream>,
        peer: String,
        config: Arc<rustls::ServerConfig>,
    ) {
        let session = match rustls::ServerConnection::new(config) {
            Ok(session) => session,
            Err(error) => return tracing::warn!("cannot start TLS for {peer}: {error}"),
        };
        let mut tls = rustls::StreamOwned::new(session, socket);
        let Some(admitted) = self.hello(&mut tls, &peer, "TLS client") else {
            if tls.conn.is_handshaking() {
                self.counters.tls_failures.fetch_add(1, Ordering::Relaxed);
            }
            return;
        };
        let rustls::StreamOwned { conn, sock } = tls;
        if sock.socket.set_nonblocking(true).is_err() {
            return;
        }
        let session = super::tls::TlsSession::new(conn, sock.socket);
        self.hand_over(
            admitted,
            Stream::Tls(Arc::new(std::sync::Mutex::new(session))),
            peer,
        );
    }

    fn admit_unix(&self, stream: UnixStream) {
        let peer = String::from("unix socket client");
        if let Err(error) = stream.set_nonblocking(false) {
            return tracing::info!("refused {peer}: {error}");
        }
        let mut socket = Deadlined::new(stream, HELLO_DEADLINE);
        let Some(admitted) = self.hello(&mut socket, &peer, "client") else {
            return;
        };
        if socket.socket.set_nonblocking(true).is_err() {
            return;
        }
        self.hand_over(
            admitted,
            Stream::Unix(mio::net::UnixStream::from_std(socket.socket)),
            peer,
        );
    }

    /// The hello exchange; a refusal or a timeout is logged and counted.
    fn hello(&self, stream: &mut dyn HelloStream, peer: &str, who: &str) -> Option<Admitted> {
        match self.handshake(stream) {
            Ok(admitted) => Some(admitted),
            Err(error) if timed_out(&error) => {
                self.counters.hello_timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    "closed {who} {peer}: it did not finish its hello within {HELLO_DEADLINE:?}"
                );
                None
            }
            Err(error) => {
                tracing::info!("refused {who} {peer}: {error:#}");
                None
            }
        }
    }

    fn hand_over(&self, admitted: Admitted, stream: Stream, peer: String) {
        let Admitted {
            shard,
            access,
            version,
        } = admitted;
        let door = &self.cores[shard as usize];
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        if door
            .sender
            .send(NewConnection {
                stream,
                peer,
                access,
                version,
            })
            .is_ok()
        {
            let _ = door.waker.wake();
        }
    }

    /// Reads the hello, checks the client's proof of the secret (or of its
    /// token's key), answers, and returns the shard the client asked for and what
    /// it may do.
    fn handshake(&self, stream: &mut dyn HelloStream) -> anyhow::Result<Admitted> {
        let (version, shard, client_nonce) = match read_frame(stream, FrameType::Hello)? {
            Ok(Frame::Hello {
                version,
                shard,
                token,
            }) => (version, shard, token),
            Ok(_) => unreachable!("read as Hello"),
            Err(message) => return refuse(stream, ErrorCode::BadFrame, message),
        };
        if !(OLDEST_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
            let message = format!("this gateway speaks protocol versions {OLDEST_PROTOCOL_VERSION} to {PROTOCOL_VERSION}, the client {version}; upgrade one of them");
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
        // The connection speaks the client's version: an older client never
        // sends what its version lacks.
        let reply = Frame::HelloOk {
            version,
            shard,
            shard_count,
            namespaces: self.namespaces.clone(),
        };
        stream.write_all(&reply.encode())?;
        Ok(Admitted {
            shard,
            access: Arc::new(access),
            version,
        })
    }
}

impl Admission {
    /// Challenge-response: sends a fresh nonce, checks the client's proof. The
    /// hello's token field is the client's nonce, then (for a token holder) the
    /// token's grant, whose key the proof must use. The inner `Err` is the
    /// refusal to send.
    fn authenticate(
        &self,
        stream: &mut dyn HelloStream,
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
    stream: &mut dyn HelloStream,
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

/// Answers with an error frame, then reads what the client still sends for a
/// moment: closing with unread input would reset the connection and could discard
/// the answer before the client reads it.
fn refuse(
    stream: &mut dyn HelloStream,
    code: ErrorCode,
    message: String,
) -> anyhow::Result<Admitted> {
    let _ = stream.write_all(
        &Frame::Error {
            request_id: 0,
            code,
            message: message.clone(),
        }
        .encode(),
    );
    let mut sink = [0u8; 4096];
    stream.cut_deadline(Duration::from_millis(200));
    while let Ok(1..) = stream.read(&mut sink) {}
    bail!("{message}")
}
