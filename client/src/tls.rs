//! A client connection's TLS session (rustls): the handshake, and the
//! session shared by the connection's writers and its receive side. The
//! session's lock is held for work on memory only: records are read from the
//! socket without blocking (a shared receive thread) or outside the lock (a
//! thread of the connection's own), and written to it outside the lock, in
//! order, under a second one. A writer whose socket is full therefore never
//! keeps the receive side from taking what the gateway sends.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A connection's TLS session, shared by its writers and its receive side
/// (a shared receive thread, which serves other connections too, so it
/// must never wait for this one's socket).
#[derive(Debug)]
pub(crate) struct TlsSession {
    /// rustls's state. Held for work on memory only, never across a
    /// blocking socket call: a writer whose socket is full (the gateway not
    /// reading) must not keep the receive side from taking what the gateway
    /// sends, or neither side would move.
    state: Mutex<TlsClient>,
    /// Held by whoever puts records on the socket, so that they leave in the
    /// order the session made them; the records taken out of the session
    /// and not yet on the socket.
    outgoing: Mutex<Vec<u8>>,
}

/// rustls's state and the records read from the socket but not yet given to
/// it (rustls takes records only while its plaintext buffer is empty).
#[derive(Debug)]
struct TlsClient {
    conn: rustls::ClientConnection,
    pending: Vec<u8>,
}

/// The socket read without blocking, for `read_tls`: `WouldBlock` when
/// nothing has arrived.
struct ReadNow(std::os::fd::RawFd);

impl Read for ReadNow {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        loop {
            match nix::sys::socket::recv(self.0, buffer, nix::sys::socket::MsgFlags::MSG_DONTWAIT) {
                Ok(count) => return Ok(count),
                Err(nix::errno::Errno::EINTR) => {}
                Err(errno) => return Err(io::Error::from(errno)),
            }
        }
    }
}

fn closed_tls() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the gateway closed the TLS connection",
    )
}

impl TlsSession {
    fn new(conn: rustls::ClientConnection) -> Self {
        Self {
            state: Mutex::new(TlsClient {
                conn,
                pending: Vec::new(),
            }),
            outgoing: Mutex::new(Vec::new()),
        }
    }

    /// Encrypts `data` and puts it on the socket (blocking), a buffer of
    /// records at a time (rustls holds up to 64 KiB of them), with the
    /// session let go of while the socket takes them.
    pub(crate) fn send(&self, tcp: &TcpStream, mut data: &[u8]) -> io::Result<()> {
        let mut outgoing = self.outgoing.lock().expect("TLS send lock");
        loop {
            if outgoing.is_empty() {
                let mut state = self.state.lock().expect("TLS session lock");
                if !data.is_empty() {
                    let taken = state.conn.writer().write(data)?;
                    data = &data[taken..];
                }
                while state.conn.wants_write() {
                    state.conn.write_tls(&mut *outgoing)?;
                }
            }
            if outgoing.is_empty() {
                return if data.is_empty() {
                    Ok(())
                } else {
                    Err(io::Error::other("TLS: the session takes no more data"))
                };
            }
            let mut socket = tcp;
            socket.write_all(&outgoing)?;
            outgoing.clear();
        }
    }

    /// Records the session made while receiving (a reply to the gateway's
    /// key update): put on the socket as far as it takes them without
    /// blocking, unless a writer is at it. What is left goes first with the
    /// connection's next request.
    fn send_replies(&self, state: &mut TlsClient, fd: std::os::fd::RawFd) -> io::Result<()> {
        let Ok(mut outgoing) = self.outgoing.try_lock() else {
            return Ok(());
        };
        while state.conn.wants_write() {
            state.conn.write_tls(&mut *outgoing)?;
        }
        while !outgoing.is_empty() {
            let flags =
                nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_NOSIGNAL;
            match nix::sys::socket::send(fd, &outgoing, flags) {
                Ok(count) => {
                    outgoing.drain(..count);
                }
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(nix::errno::Errno::EINTR) => {}
                Err(errno) => return Err(io::Error::from(errno)),
            }
        }
        Ok(())
    }

    /// Plaintext into `buffer` without blocking: `None` when nothing has
    /// arrived (the socket has nothing and the session holds nothing); the
    /// end of the connection is `UnexpectedEof`.
    pub(crate) fn receive_now(
        &self,
        fd: std::os::fd::RawFd,
        buffer: &mut [u8],
    ) -> io::Result<Option<usize>> {
        let mut guard = self.state.lock().expect("TLS session lock");
        let state = &mut *guard;
        let mut ended = false;
        loop {
            match state.conn.reader().read(buffer) {
                Ok(0) if !buffer.is_empty() => return Err(closed_tls()),
                Ok(count) => return Ok(Some(count)),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock && ended => {
                    return Err(closed_tls())
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error),
            }
            let read = if state.pending.is_empty() {
                state.conn.read_tls(&mut ReadNow(fd))
            } else {
                let taken = state.conn.read_tls(&mut state.pending.as_slice());
                if let Ok(taken) = taken {
                    state.pending.drain(..taken);
                }
                taken
            };
            match read {
                Ok(0) => ended = true,
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(error) => return Err(error),
            }
            state.conn.process_new_packets().map_err(tls_error)?;
            if state.conn.wants_write() {
                self.send_replies(state, fd)?;
            }
        }
    }

    /// Plaintext into `buffer`, waiting for the socket (with the session let
    /// go of) while nothing has arrived: the hello, and a connection with a
    /// receive thread of its own.
    pub(crate) fn receive(&self, tcp: &TcpStream, buffer: &mut [u8]) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        let mut records = [0u8; 16 << 10];
        loop {
            {
                let mut guard = self.state.lock().expect("TLS session lock");
                let state = &mut *guard;
                match state.conn.reader().read(buffer) {
                    Ok(count) => return Ok(count),
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                    Err(error) => return Err(error),
                }
                if !state.pending.is_empty() {
                    let taken = state.conn.read_tls(&mut state.pending.as_slice())?;
                    state.pending.drain(..taken);
                    state.conn.process_new_packets().map_err(tls_error)?;
                    if state.conn.wants_write() {
                        self.send_replies(state, tcp.as_raw_fd())?;
                    }
                    continue;
                }
            }
            let mut socket = tcp;
            let count = socket.read(&mut records)?;
            if count == 0 {
                return Err(closed_tls());
            }
            self.state
                .lock()
                .expect("TLS session lock")
                .pending
                .extend_from_slice(&records[..count]);
        }
    }
}

/// A TLS failure as an I/O error, with the fix where the gateway's alert
/// says what it wanted.
fn tls_error(error: rustls::Error) -> io::Error {
    use rustls::AlertDescription as Alert;
    let hint = match &error {
        rustls::Error::AlertReceived(Alert::CertificateRequired) => {
            "; the gateway requires a client certificate: set TlsOptions::cert_file and key_file (Python tls_cert_file=, tls_key_file=)"
        }
        rustls::Error::AlertReceived(
            Alert::BadCertificate | Alert::UnknownCA | Alert::CertificateUnknown | Alert::DecryptError,
        ) => "; the gateway did not accept this client's certificate: it must be signed by the CA in the gateway's tls_client_ca_file",
        _ => "",
    };
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("TLS: {error}{hint}"),
    )
}

/// The TLS handshake on a fresh connection, verifying the gateway's
/// certificate against the CA file and the expected name (the host of
/// `address` unless the options name another).
pub(crate) fn handshake(
    tcp: &mut TcpStream,
    address: &str,
    options: &crate::TlsOptions,
    timeout: Duration,
) -> io::Result<TlsSession> {
    use rustls::pki_types::pem::PemObject;
    let invalid_input = |message: String| io::Error::new(io::ErrorKind::InvalidInput, message);
    let mut roots = rustls::RootCertStore::empty();
    let certificates =
        rustls::pki_types::CertificateDer::pem_file_iter(&options.ca_file).map_err(|error| {
            invalid_input(format!(
                "cannot read the TLS CA file {}: {error}",
                options.ca_file.display()
            ))
        })?;
    for certificate in certificates {
        let certificate = certificate
            .map_err(|error| invalid_input(format!("{}: {error}", options.ca_file.display())))?;
        roots
            .add(certificate)
            .map_err(|error| invalid_input(format!("{}: {error}", options.ca_file.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| invalid_input(error.to_string()))?
        .with_root_certificates(roots);
    let config = match (&options.cert_file, &options.key_file) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert_file), Some(key_file)) => {
            let read = |what: &str, path: &std::path::Path, error: &dyn std::fmt::Display| {
                invalid_input(format!("cannot read the client TLS {what} {}: {error}", path.display()))
            };
            let certs = rustls::pki_types::CertificateDer::pem_file_iter(cert_file)
                .map_err(|error| read("certificate", cert_file, &error))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| read("certificate", cert_file, &error))?;
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key_file)
                .map_err(|error| read("key", key_file, &error))?;
            builder.with_client_auth_cert(certs, key).map_err(|error| {
                invalid_input(format!(
                    "the client TLS certificate {} and key {} do not match or are unsupported: {error}",
                    cert_file.display(),
                    key_file.display()
                ))
            })?
        }
        _ => {
            return Err(invalid_input(
                "TlsOptions: set both cert_file and key_file (the client certificate and its key) or neither".into(),
            ))
        }
    };
    let host = options.server_name.clone().unwrap_or_else(|| {
        address
            .rsplit_once(':')
            .map_or(address, |(host, _)| host)
            .trim_matches(['[', ']'])
            .to_owned()
    });
    let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|_| {
        invalid_input(format!(
            "{host:?} is not a valid TLS server name; set TlsOptions::server_name"
        ))
    })?;
    let mut session = rustls::ClientConnection::new(Arc::new(config), name)
        .map_err(|error| invalid_input(error.to_string()))?;
    tcp.set_read_timeout(Some(timeout))?;
    while session.is_handshaking() {
        session.complete_io(tcp).map_err(|error| {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("TLS handshake with {address} failed: {error}"),
            )
        })?;
    }
    Ok(TlsSession::new(session))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    /// Bytes each side sends: more than two loopback sockets' buffers hold.
    const EACH_WAY: usize = 24 << 20;
    const CHUNK: usize = 1 << 20;

    /// The byte at `offset` of what side `side` sends.
    fn pattern(side: u8, offset: usize) -> u8 {
        ((offset as u64).wrapping_mul(2_654_435_761) >> 13) as u8 ^ side
    }

    fn fill(side: u8, start: usize, chunk: &mut [u8]) {
        for (index, byte) in chunk.iter_mut().enumerate() {
            *byte = pattern(side, start + index);
        }
    }

    /// The session under what a gateway may do to it: it asks for a key
    /// update before every MiB it sends (rustls answers with one of its own,
    /// made on the receive side, which must reach the socket in order with
    /// what the writer sends meanwhile), and it sends 24 MiB before it reads
    /// anything while the client sends 24 MiB too: the writer is stuck on a
    /// full socket, and the receive side, reading without blocking as a
    /// shared receive thread does, must take everything all the same. (When
    /// the writer held the session's lock while it waited on the socket,
    /// neither side moved.) Every byte is checked both ways.
    #[test]
    fn key_updates_and_a_writer_stuck_on_a_full_socket_leave_the_receive_side_free() {
        let rcgen::CertifiedKey { cert, key_pair } =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("certificate");
        let dir = tempfile::tempdir().expect("dir");
        let ca_file = dir.path().join("gateway.crt");
        std::fs::write(&ca_file, cert.pem()).expect("write the certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server_config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key_pair.serialize_der().into()),
            )
            .expect("server config");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        let gateway = std::thread::spawn(move || {
            let (mut tcp, _) = listener.accept().expect("accept");
            let mut conn = rustls::ServerConnection::new(Arc::new(server_config)).expect("server");
            while conn.is_handshaking() {
                conn.complete_io(&mut tcp).expect("handshake");
            }
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut chunk = vec![0u8; CHUNK];
            for start in (0..EACH_WAY).step_by(CHUNK) {
                tls.conn.refresh_traffic_keys().expect("a key update");
                fill(1, start, &mut chunk);
                tls.write_all(&chunk).expect("sent to the client");
            }
            tls.flush().expect("flushed");
            let mut expected = vec![0u8; CHUNK];
            for start in (0..EACH_WAY).step_by(CHUNK) {
                tls.read_exact(&mut chunk).expect("the client's bytes");
                fill(2, start, &mut expected);
                assert!(chunk == expected, "the client's bytes at {start}");
            }
        });

        let mut tcp = TcpStream::connect(&address).expect("connect");
        let options = crate::TlsOptions {
            ca_file,
            server_name: None,
            cert_file: None,
            key_file: None,
        };
        let session = Arc::new(
            handshake(&mut tcp, &address, &options, Duration::from_secs(10)).expect("handshake"),
        );
        tcp.set_read_timeout(None).expect("blocking again");
        let writer = {
            let (session, tcp) = (Arc::clone(&session), tcp.try_clone().expect("clone"));
            std::thread::spawn(move || {
                let mut chunk = vec![0u8; CHUNK];
                for start in (0..EACH_WAY).step_by(CHUNK) {
                    fill(2, start, &mut chunk);
                    session.send(&tcp, &chunk).expect("sent to the gateway");
                }
            })
        };
        // The receive side on a thread of its own, so that a deadlock fails
        // the test instead of hanging it.
        let (done, finished) = std::sync::mpsc::channel();
        let receiver = std::thread::spawn(move || {
            let mut buffer = vec![0u8; 256 << 10];
            let mut received = 0;
            while received < EACH_WAY {
                match session
                    .receive_now(tcp.as_raw_fd(), &mut buffer)
                    .expect("received")
                {
                    Some(count) => {
                        for (index, byte) in buffer[..count].iter().enumerate() {
                            assert_eq!(
                                *byte,
                                pattern(1, received + index),
                                "at {}",
                                received + index
                            );
                        }
                        received += count;
                    }
                    None => std::thread::sleep(Duration::from_millis(1)),
                }
            }
            done.send(()).expect("the test waits");
        });
        finished.recv_timeout(Duration::from_secs(120)).expect(
            "the receive side takes all the gateway sends within 2 minutes (else: deadlocked)",
        );
        receiver.join().expect("received every byte");
        writer.join().expect("the writer sent everything");
        gateway
            .join()
            .expect("the gateway read every byte it was sent");
    }
}
