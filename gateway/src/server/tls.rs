//! TLS (rustls, ring) on client TCP connections, when `gateway.tls_cert_file`
//! and `gateway.tls_key_file` are set: the hello and everything after it are
//! encrypted. The session is shared by the connection's reader (the core's
//! receive path) and its transport (`TcpTransport` over [`TlsWriter`]), both on
//! the connection's core; the mutex is never contended.
//!
//! Cost: TLS copies each payload into rustls's buffer and encrypts it, so the
//! zero-copy property of the plain TCP path does not hold here; RDMA payloads
//! (which bypass the socket) are unaffected.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use transport::{Progress, RemoteWrite, TcpTransport, Transport};

/// The TLS server config, read again from its files on SIGHUP (a renewed
/// certificate, a new client CA) without a restart: new handshakes use the
/// new one, connections already up keep theirs.
#[derive(Debug)]
pub struct ReloadableTls {
    files: config::TlsFiles,
    current: std::sync::RwLock<Arc<rustls::ServerConfig>>,
}

impl ReloadableTls {
    pub fn load(files: &config::TlsFiles) -> anyhow::Result<Self> {
        Ok(Self {
            current: std::sync::RwLock::new(server_config(files)?),
            files: files.clone(),
        })
    }

    /// The config new handshakes use.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.current.read().expect("tls config lock"))
    }

    /// Reads the files again; on any problem the current config stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let fresh = server_config(&self.files)?;
        *self.current.write().expect("tls config lock") = fresh;
        Ok(())
    }

    pub fn cert_file(&self) -> &Path {
        &self.files.cert_file
    }
}

/// Most plaintext rustls buffers for sending before writes report `WouldBlock`.
const SEND_BUFFER_BYTES: usize = 1 << 20;

pub fn server_config(files: &config::TlsFiles) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let (cert_file, key_file) = (files.cert_file.as_path(), files.key_file.as_path());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .with_context(|| {
            format!(
                "cannot read the TLS certificate file {}",
                cert_file.display()
            )
        })?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: not a PEM certificate chain", cert_file.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no PEM certificate; give gateway.tls_cert_file the server's certificate chain", cert_file.display());
    }
    let key = PrivateKeyDer::from_pem_file(key_file).with_context(|| {
        format!(
            "cannot read a PEM private key from {} (gateway.tls_key_file)",
            key_file.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &files.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(read_roots(ca_file)?),
                provider,
            )
            .build()
            .context("cannot build the client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(certs, key)
        .context("the TLS certificate and key do not match or are unsupported")?;
    Ok(Arc::new(config))
}

/// The CA certificates client certificates must chain to (mutual TLS).
fn read_roots(ca_file: &Path) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(ca_file).with_context(|| {
        format!(
            "cannot read the client CA file {} (gateway.tls_client_ca_file)",
            ca_file.display()
        )
    })? {
        let certificate =
            certificate.with_context(|| format!("{}: not a PEM certificate", ca_file.display()))?;
        roots
            .add(certificate)
            .with_context(|| format!("{}: not a usable CA certificate", ca_file.display()))?;
    }
    if roots.is_empty() {
        anyhow::bail!(
            "{} holds no CA certificate; give gateway.tls_client_ca_file the PEM of the CA that signs client certificates",
            ca_file.display()
        );
    }
    Ok(roots)
}

/// One connection's TLS state and its (non-blocking) socket.
#[derive(Debug)]
pub struct TlsSession {
    pub conn: rustls::ServerConnection,
    pub tcp: std::net::TcpStream,
    /// Record bytes the socket took since the transport last asked (a client
    /// draining a full record buffer is slow, not stalled).
    records_sent: u64,
}

pub type SharedSession = Arc<Mutex<TlsSession>>;

impl TlsSession {
    pub fn new(conn: rustls::ServerConnection, tcp: std::net::TcpStream) -> Self {
        Self {
            conn,
            tcp,
            records_sent: 0,
        }
    }

    /// Writes buffered TLS records to the socket until it would block.
    fn flush_records(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.tcp) {
                Ok(written) => self.records_sent += written as u64,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }
}

/// Plaintext from the session: decrypts what the socket has. `Ok(0)` is the
/// end of the stream; `WouldBlock` means nothing more for now.
pub fn read(session: &SharedSession, buffer: &mut [u8]) -> io::Result<usize> {
    let mut session = session.lock().expect("TLS session lock");
    loop {
        match session.conn.reader().read(buffer) {
            Ok(count) => return Ok(count),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
        let TlsSession { conn, tcp, .. } = &mut *session;
        if conn.read_tls(tcp)? == 0 {
            return Ok(0);
        }
        conn.process_new_packets()
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
        session.flush_records()?;
    }
}

/// Sends close_notify and ends our side.
pub fn close(session: &SharedSession) {
    let mut session = session.lock().expect("TLS session lock");
    session.conn.send_close_notify();
    let _ = session.flush_records();
    let _ = session.tcp.shutdown(std::net::Shutdown::Write);
}

/// A non-blocking `Write` of plaintext into the session, so the TCP transport's
/// queueing works unchanged over TLS.
#[derive(Debug)]
pub struct TlsWriter {
    session: SharedSession,
}

impl Write for TlsWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut session = self.session.lock().expect("TLS session lock");
        session.flush_records()?;
        if session.conn.wants_write() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let accepted = session.conn.writer().write(bytes)?;
        session.flush_records()?;
        if accepted == 0 && !bytes.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(accepted)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.session
            .lock()
            .expect("TLS session lock")
            .flush_records()
    }
}

/// The TCP transport over TLS: pending while either its queue or rustls's
/// record buffer holds bytes.
#[derive(Debug)]
pub struct TlsTransport {
    inner: TcpTransport<TlsWriter>,
    session: SharedSession,
}

impl TlsTransport {
    pub fn new(session: SharedSession) -> Self {
        session
            .lock()
            .expect("TLS session lock")
            .conn
            .set_buffer_limit(Some(SEND_BUFFER_BYTES));
        Self {
            inner: TcpTransport::new(TlsWriter {
                session: Arc::clone(&session),
            }),
            session,
        }
    }
}

impl Transport for TlsTransport {
    fn name(&self) -> &'static str {
        "tls"
    }

    fn write(&mut self, write: RemoteWrite) {
        self.inner.write(write);
    }

    fn notify(&mut self, frame: &protocol::Frame) {
        self.inner.notify(frame);
    }

    fn progress(&mut self) -> io::Result<Progress> {
        let mut progress = self.inner.progress()?;
        let mut session = self.session.lock().expect("TLS session lock");
        session.flush_records()?;
        progress.bytes_taken += std::mem::take(&mut session.records_sent);
        Ok(progress)
    }

    fn has_pending(&self) -> bool {
        self.inner.has_pending()
            || self
                .session
                .lock()
                .expect("TLS session lock")
                .conn
                .wants_write()
    }
}
