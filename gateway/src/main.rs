//! `dualpath`: the gateway binary and the tools that work on its block store.
//!
//! Exit codes: 0 success, 1 any other failure, 2 usage or configuration error,
//! 3 block or namespace not found, 4 corrupt data found.

use std::path::PathBuf;
use std::process::ExitCode;

use block_layout::BlockKey;
use clap::{Parser, Subcommand};
use config::{ByteSize, ConfigError, GatewayConfig};
use gateway::commands::bench_e2e::{bench_e2e, BenchE2eOptions};
use gateway::commands::bench_load::{bench_load, BenchLoadOptions};
use gateway::commands::bench_object::{bench_object, BenchObjectOptions};
use gateway::commands::bench_storage::{bench_storage, BenchStorageOptions};
use gateway::commands::bench_store::{bench_store, BenchStoreOptions};
use gateway::commands::bench_transport::{bench_transport, BenchTransportOptions};
use gateway::commands::blocks;
use gateway::commands::import::{import, Source};
use storage_backends::StoreError;

#[derive(Debug, Parser)]
#[command(
    name = "dualpath",
    version,
    about = "dualpath storage gateway for disaggregated LLM inference"
)]
struct Cli {
    /// Gateway configuration (TOML); without it, the embedded default (a store under ./data).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway: serve clients on the configured sockets until SIGTERM/SIGINT.
    Serve,
    /// Store one block from a file ("-" for stdin).
    Put {
        #[arg(long, short)]
        namespace: String,
        #[arg(long, short)]
        key: BlockKey,
        #[arg(long, short, default_value = "-")]
        input: PathBuf,
    },
    /// Write one block (or a layer range) to a file ("-" for stdout).
    Get {
        #[arg(long, short)]
        namespace: String,
        #[arg(long, short)]
        key: BlockKey,
        /// Layer range START..END (END exclusive) or one layer.
        #[arg(long)]
        layers: Option<String>,
        #[arg(long, short, default_value = "-")]
        output: PathBuf,
    },
    /// Remove blocks from the store, durably (with the gateway stopped; while
    /// it runs, engines remove through it: `Client::remove`). Exit 3 if a key
    /// was not stored (the others are removed all the same).
    Rm {
        #[arg(long, short)]
        namespace: String,
        /// The blocks' keys (32 hex digits each).
        #[arg(long = "key", short, required = true, num_args = 1..)]
        keys: Vec<BlockKey>,
    },
    /// Delete a namespace from the store: every block of it, and (local
    /// store) its files and their reserved space. Take it out of the config
    /// first, and stop the gateway (a local store is one process's at a time).
    DropNamespace {
        /// The namespace's name.
        name: String,
    },
    /// Show the store's namespaces, fill and staging memory.
    Stat,
    /// Check what `serve` needs (config, secret, TLS files, listen addresses,
    /// open-files limit, the store with its staging memory and I/O engine,
    /// RDMA) without serving: one line each, with the fix. Exit 1 if the
    /// gateway would not start. Run it with the gateway stopped (the store
    /// and the addresses are its then).
    Check,
    /// Issue an access token for one client: it may read the namespaces given
    /// with --read (and --write) and store into those given with --write ("*":
    /// all). Needs the cluster secret (auth_secret_file or DUALPATH_SECRET); the
    /// client never sees the secret.
    Token {
        /// A name for the client, shown in the gateway's refusals and logs.
        #[arg(long)]
        client: String,
        #[arg(long, value_delimiter = ',')]
        read: Vec<String>,
        #[arg(long, value_delimiter = ',')]
        write: Vec<String>,
        /// How long the token is good for: seconds, or with a unit (90s, 30m,
        /// 12h, 7d). Without it, until the cluster secret changes. Gateways
        /// refuse it from then on, also on connections already open.
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<u64>,
    },
    /// Bulk-load blocks from a directory (files named by hex key) or a synthetic set.
    Import {
        #[arg(long, short)]
        namespace: String,
        #[arg(
            long,
            conflicts_with = "synthetic",
            required_unless_present = "synthetic"
        )]
        dir: Option<PathBuf>,
        /// Number of synthetic blocks to generate.
        #[arg(long)]
        synthetic: Option<u64>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Read back every block, checking checksums (and synthetic contents with --synthetic-seed).
    Verify {
        #[arg(long)]
        synthetic_seed: Option<u64>,
        /// Take blocks that fail their checksum out of the store (local
        /// store), as a running gateway does when it reads one.
        #[arg(long)]
        drop_corrupt: bool,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        target: BenchTarget,
    },
}

#[derive(Debug, Subcommand)]
enum BenchTarget {
    /// Host-to-device copy rate from the client's pinned staging (copies of one
    /// layer each, as loads deliver them) against one cudaMemcpyAsync of pinned
    /// memory (the peak), interleaved. Needs a CUDA device.
    Gpu {
        #[arg(long, default_value = "1GiB", value_parser = parse_size)]
        size: u64,
        /// Bytes per copy (a DeepSeek-V3.2 layer of 64 blocks is about 2.7 MB).
        #[arg(long, default_value = "2688KiB", value_parser = parse_size)]
        chunk: u64,
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        #[arg(long, default_value_t = 0)]
        device: usize,
    },
    /// Read blocks through the uring backend and with fio, interleaved.
    Storage {
        /// Where the bench stores live (on the disk under test).
        #[arg(long, default_value = "./bench-data")]
        dir: PathBuf,
        /// Bytes read per block size per run.
        #[arg(long, default_value = "2GiB", value_parser = parse_size)]
        size: u64,
        #[arg(long, value_delimiter = ',', default_value = "256KiB,1MiB,4MiB", value_parser = parse_size)]
        block_sizes: Vec<u64>,
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        #[arg(long, default_value_t = 32)]
        queue_depth: u32,
        /// Shards (threads); default: the config's cores.
        #[arg(long)]
        shards: Option<u32>,
        /// Skip the fio reference.
        #[arg(long)]
        no_fio: bool,
        /// "auto", "uring", or "blocking" (the fallback where io_uring is refused).
        #[arg(long, default_value = "auto", value_parser = parse_io_engine)]
        io_engine: storage_backends::uring::IoEngine,
    },
    /// Storage -> gateway -> TCP -> client region, through a real gateway, against fio.
    E2e {
        #[arg(long, default_value = "./bench-data/e2e")]
        dir: PathBuf,
        #[arg(long, default_value = "2GiB", value_parser = parse_size)]
        size: u64,
        #[arg(long, default_value = "1MiB", value_parser = parse_size)]
        block_size: u64,
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        #[arg(long, default_value_t = 32)]
        queue_depth: u32,
        #[arg(long, default_value_t = 2)]
        cores: u32,
        /// How blocks lie on disk: "full" (one read per block) or "layer" (the
        /// gateway reads layer by layer, and fio reads layer-sized pieces).
        #[arg(long, default_value = "full", value_parser = ["full", "layer"])]
        layout: String,
        /// Also run, interleaved, a gateway whose background scrub reads at
        /// this many MiB/s per core, and print what it costs the loads.
        #[arg(long)]
        scrub_mib_per_s: Option<u32>,
    },
    /// Client -> gateway -> durable on disk, one at a time and pipelined, against fio writes.
    Store {
        #[arg(long, default_value = "./bench-data/store")]
        dir: PathBuf,
        #[arg(long, default_value = "512MiB", value_parser = parse_size)]
        size: u64,
        #[arg(long, default_value = "2MiB", value_parser = parse_size)]
        block_size: u64,
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        #[arg(long, default_value_t = 1)]
        cores: u32,
        /// Stores by the gateway's RDMA READ from a registered pool against
        /// the same blocks over the socket (needs an RDMA device; run by
        /// `scripts/bench-rdma.sh store` in the Soft-RoCE VM).
        #[arg(long)]
        rdma: bool,
    },
    /// Read blocks from an S3-compatible store through the object backend, against boto3.
    Object {
        #[arg(long)]
        endpoint: String,
        #[arg(long, default_value = "dualpath-bench")]
        bucket: String,
        /// Credentials; default: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
        #[arg(long, env = "AWS_ACCESS_KEY_ID")]
        access_key_id: String,
        #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
        secret_access_key: String,
        #[arg(long, default_value_t = 256)]
        blocks: u64,
        #[arg(long, default_value = "1MiB", value_parser = parse_size)]
        block_size: u64,
        #[arg(long, default_value_t = 16)]
        concurrency: u32,
        #[arg(long, default_value_t = 3)]
        rounds: u32,
    },
    /// The prefill node's side of the emulated cluster: load a synthetic set through
    /// the paths a policy allows; prints throughput and request latency.
    Load {
        /// Gateway addresses (repeat).
        #[arg(long = "gateway", required = true)]
        gateways: Vec<String>,
        /// The shared object store for the PE path (http://host:port).
        #[arg(long)]
        pe_endpoint: Option<String>,
        #[arg(long, default_value = "dualpath-kv")]
        bucket: String,
        #[arg(long, default_value = "")]
        prefix: String,
        #[arg(long, env = "AWS_ACCESS_KEY_ID", default_value = "")]
        access_key_id: String,
        #[arg(
            long,
            env = "AWS_SECRET_ACCESS_KEY",
            default_value = "",
            hide_env_values = true
        )]
        secret_access_key: String,
        /// pe-only, de-only or dualpath.
        #[arg(long, default_value = "dualpath")]
        policy: String,
        #[arg(long, short, default_value = "default")]
        namespace: String,
        #[arg(long)]
        blocks: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 32)]
        blocks_per_request: u64,
        #[arg(long, default_value_t = 4)]
        requests_in_flight: usize,
        /// PE-path requests in flight.
        #[arg(long, default_value_t = 16)]
        pe_concurrency: u32,
        /// Check every loaded byte against the synthetic contents.
        #[arg(long)]
        verify: bool,
        /// Load each request from the first gateway alone (`Client::load`: no
        /// path choice, no PE path) instead of `load_dual`.
        #[arg(long)]
        one_gateway: bool,
        /// Cancel every Nth request right after sending it, and check that
        /// nothing lands in its memory afterwards (0: never).
        #[arg(long, default_value_t = 0)]
        cancel_every: u64,
        /// Gateways write by RDMA (required): the first RDMA device, RoCE v2
        /// GID index 1.
        #[arg(long)]
        rdma: bool,
        /// Connect over TLS, trusting the CA certificate (PEM) in this file.
        #[arg(long, value_name = "FILE")]
        tls_ca: Option<std::path::PathBuf>,
    },
    /// Memory to memory over the TCP transport, against iperf3 and Mooncake's TCP transport.
    Transport {
        /// Seconds per run.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value = "256KiB", value_parser = parse_size)]
        block_size: u64,
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        #[arg(long)]
        no_iperf: bool,
        #[arg(long)]
        no_mooncake: bool,
        /// Gateway cores (each serves its own client connection).
        #[arg(long, default_value_t = 1)]
        cores: u32,
        /// Use the RDMA transport and compare with ib_write_bw (perftest) on the
        /// same device instead of iperf3 and Mooncake.
        #[arg(long)]
        rdma: bool,
    },
}

/// `verify` found blocks that fail their checksum or hold the wrong bytes.
#[derive(Debug, thiserror::Error)]
#[error("verify found {0} damaged blocks (listed above)")]
struct DamagedBlocks(u64);

fn parse_size(text: &str) -> Result<u64, String> {
    ByteSize::parse(text).map(|size| size.0)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The service logs its life cycle; the tools only what goes wrong.
    // `check` reports what the steps it runs would log.
    init_logging(if matches!(cli.command, Command::Check) {
        "error"
    } else if matches!(cli.command, Command::Serve) {
        "info"
    } else {
        "warn"
    });
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("dualpath: error: {error:#}");
            ExitCode::from(exit_code(&error))
        }
    }
}

fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DUALPATH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colours only for a terminal: not escape codes in journald or a log file.
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colours)
        .init();
}

fn exit_code(error: &anyhow::Error) -> u8 {
    for cause in error.chain() {
        if cause.downcast_ref::<DamagedBlocks>().is_some() {
            return 4;
        }
        if cause.downcast_ref::<ConfigError>().is_some() {
            return 2;
        }
        match cause.downcast_ref::<StoreError>() {
            Some(StoreError::NotFound { .. } | StoreError::UnknownNamespace { .. }) => return 3,
            Some(StoreError::Corrupt { .. }) => return 4,
            _ => {}
        }
    }
    1
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<GatewayConfig> {
    match path {
        Some(path) => Ok(GatewayConfig::load(path)?),
        None => Ok(GatewayConfig::embedded_default()),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = load_config(cli.config.as_ref())?;
    match cli.command {
        Command::Serve => gateway::server::run(config, cli.config.as_deref()),
        Command::Put {
            namespace,
            key,
            input,
        } => blocks::put(&config, &namespace, key, &input),
        Command::Get {
            namespace,
            key,
            layers,
            output,
        } => blocks::get(&config, &namespace, key, layers.as_deref(), &output),
        Command::Rm { namespace, keys } => blocks::remove(&config, &namespace, &keys),
        Command::DropNamespace { name } => blocks::drop_namespace(&config, &name),
        Command::Stat => blocks::stat(&config),
        Command::Check => {
            let findings = gateway::server::check::check(&config);
            for finding in &findings {
                println!("{finding}");
            }
            let count = |verdict| {
                findings
                    .iter()
                    .filter(|finding| finding.verdict == verdict)
                    .count()
            };
            let (failures, warnings) = (
                count(gateway::server::check::Verdict::Fail),
                count(gateway::server::check::Verdict::Warn),
            );
            let plural = |count: usize, word: &str| {
                format!("{count} {word}{}", if count == 1 { "" } else { "s" })
            };
            println!(
                "check: {}, {}",
                plural(failures, "problem"),
                plural(warnings, "warning")
            );
            if failures > 0 {
                anyhow::bail!("{failures} of the checks above failed: `serve` would not start");
            }
            Ok(())
        }
        Command::Token {
            client,
            read,
            write,
            ttl,
        } => {
            let secret = anyhow::Context::context(gateway::server::cluster_secret(&config)?,
                "no cluster secret: set gateway.auth_secret_file or DUALPATH_SECRET (tokens are derived from it)",
            )?;
            let expires = ttl.map(|seconds| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |now| now.as_secs())
                    .saturating_add(seconds)
            });
            let grant = protocol::auth::AccessGrant {
                client,
                read,
                write,
                expires,
            };
            if let Some(expires) = expires {
                eprintln!("the token expires at Unix time {expires}");
            }
            let token = protocol::auth::issue_token(&secret, &grant)
                .map_err(|problem| anyhow::anyhow!("{problem}"))?;
            println!("{token}");
            Ok(())
        }
        Command::Import {
            namespace,
            dir,
            synthetic,
            seed,
        } => {
            let source = match (dir, synthetic) {
                (Some(dir), _) => Source::Directory(dir),
                (None, Some(count)) => Source::Synthetic { count, seed },
                (None, None) => unreachable!("clap requires one of --dir and --synthetic"),
            };
            let imported = import(&config, &namespace, &source)?;
            eprintln!("imported {imported} blocks into namespace {namespace:?}");
            Ok(())
        }
        Command::Verify {
            synthetic_seed,
            drop_corrupt,
        } => {
            let report = blocks::verify(&config, synthetic_seed, drop_corrupt)?;
            println!(
                "{} blocks ok, {} corrupt{}, {} with wrong contents",
                report.blocks_ok,
                report.corrupt,
                if report.dropped > 0 {
                    format!(" ({} taken out of the store)", report.dropped)
                } else {
                    String::new()
                },
                report.wrong_content
            );
            if report.corrupt + report.wrong_content > 0 {
                return Err(DamagedBlocks(report.corrupt + report.wrong_content).into());
            }
            Ok(())
        }
        Command::Bench {
            target:
                BenchTarget::Load {
                    gateways,
                    pe_endpoint,
                    bucket,
                    prefix,
                    access_key_id,
                    secret_access_key,
                    policy,
                    namespace,
                    blocks,
                    seed,
                    blocks_per_request,
                    requests_in_flight,
                    pe_concurrency,
                    verify,
                    one_gateway,
                    cancel_every,
                    rdma,
                    tls_ca,
                },
        } => {
            let pe_storage = pe_endpoint.map(|endpoint| client::ObjectSettings {
                endpoint,
                bucket,
                region: "us-east-1".into(),
                path_style: true,
                access_key_id,
                secret_access_key,
                prefix,
                concurrency: pe_concurrency,
                timeout: std::time::Duration::from_secs(30),
                retries: 3,
            });
            let policy = policy
                .parse()
                .map_err(|message: String| anyhow::anyhow!(message))?;
            let secret =
                std::env::var_os("DUALPATH_SECRET").map(|value| value.into_encoded_bytes());
            bench_load(&BenchLoadOptions {
                gateways,
                pe_storage,
                policy,
                namespace,
                blocks,
                seed,
                blocks_per_request,
                requests_in_flight,
                secret,
                verify,
                one_gateway,
                cancel_every,
                rdma,
                tls_ca,
            })
        }
        Command::Bench {
            target:
                BenchTarget::Object {
                    endpoint,
                    bucket,
                    access_key_id,
                    secret_access_key,
                    blocks,
                    block_size,
                    concurrency,
                    rounds,
                },
        } => bench_object(&BenchObjectOptions {
            endpoint,
            bucket,
            access_key_id,
            secret_access_key,
            blocks,
            block_bytes: block_size,
            concurrency,
            rounds,
        }),
        Command::Bench {
            target:
                BenchTarget::E2e {
                    dir,
                    size,
                    block_size,
                    rounds,
                    queue_depth,
                    cores,
                    layout,
                    scrub_mib_per_s,
                },
        } => bench_e2e(&BenchE2eOptions {
            directory: dir,
            total_bytes: size,
            block_bytes: block_size,
            rounds,
            queue_depth,
            cores,
            layer_layout: layout == "layer",
            scrub_mib_per_s,
        }),
        Command::Bench {
            target:
                BenchTarget::Store {
                    dir,
                    size,
                    block_size,
                    rounds,
                    cores,
                    rdma,
                },
        } => bench_store(&BenchStoreOptions {
            directory: dir,
            total_bytes: size,
            block_bytes: block_size,
            rounds,
            cores,
            rdma,
        }),
        Command::Bench {
            target:
                BenchTarget::Transport {
                    seconds,
                    block_size,
                    rounds,
                    no_iperf,
                    no_mooncake,
                    cores,
                    rdma,
                },
        } => bench_transport(&BenchTransportOptions {
            seconds,
            block_bytes: block_size,
            rounds,
            with_iperf: !no_iperf && !rdma,
            with_mooncake: !no_mooncake && !rdma,
            cores,
            rdma,
        }),
        Command::Bench {
            target:
                BenchTarget::Gpu {
                    size,
                    chunk,
                    rounds,
                    device,
                },
        } => {
            let gpu = anyhow::Context::context(
                client::gpu::GpuDevice::open(device),
                "bench gpu needs a CUDA device",
            )?;
            let samples = client::gpu::bench_host_to_device(
                &gpu,
                usize::try_from(size)?,
                usize::try_from(chunk)?,
                rounds,
            )?;
            for (round, (ours, peak)) in samples.iter().enumerate() {
                println!(
                    "  round {round}: ours {:.2} GB/s, cudaMemcpyAsync peak {:.2} GB/s",
                    ours / 1e9,
                    peak / 1e9
                );
            }
            let median =
                |values: Vec<f64>| gateway::commands::bench_storage::median(values.into_iter());
            let ours = median(samples.iter().map(|sample| sample.0).collect());
            let peak = median(samples.iter().map(|sample| sample.1).collect());
            println!(
                "host to device, {} in {} copies: ours {:.2} GB/s, peak {:.2} GB/s (medians); ours / peak = {:.3}",
                config::ByteSize(size),
                config::ByteSize(chunk),
                ours / 1e9,
                peak / 1e9,
                ours / peak
            );
            Ok(())
        }
        Command::Bench {
            target:
                BenchTarget::Storage {
                    dir,
                    size,
                    block_sizes,
                    rounds,
                    queue_depth,
                    shards,
                    no_fio,
                    io_engine,
                },
        } => bench_storage(&BenchStorageOptions {
            directory: dir,
            total_bytes: size,
            block_sizes,
            rounds,
            queue_depth,
            shards: shards.unwrap_or(config.cores),
            with_fio: !no_fio,
            io_engine,
        }),
    }
}

fn parse_io_engine(text: &str) -> Result<storage_backends::uring::IoEngine, String> {
    use storage_backends::uring::IoEngine;
    match text {
        "auto" => Ok(IoEngine::Auto),
        "uring" => Ok(IoEngine::Uring),
        "blocking" => Ok(IoEngine::Blocking),
        other => Err(format!("{other:?}: use auto, uring or blocking")),
    }
}

/// A token lifetime: seconds, or a number with s, m, h or d.
fn parse_ttl(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let not_a_duration = || {
        format!("{text:?} is not a duration: use seconds or a number with s, m, h or d (e.g. 90s, 30m, 12h, 7d)")
    };
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(not_a_duration()),
    };
    let value: u64 = number.parse().map_err(|_| not_a_duration())?;
    match value.checked_mul(scale) {
        Some(0) => {
            Err("a token that expires at once is of no use: give a positive duration".into())
        }
        Some(seconds) => Ok(seconds),
        None => Err(format!("{text:?} is too long")),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_ttl;

    #[test]
    fn token_lifetimes_take_seconds_or_a_unit_and_refuse_nonsense() {
        assert_eq!(parse_ttl("90"), Ok(90));
        assert_eq!(parse_ttl("90s"), Ok(90));
        assert_eq!(parse_ttl("30m"), Ok(1800));
        assert_eq!(parse_ttl("12h"), Ok(43_200));
        assert_eq!(parse_ttl("7d"), Ok(604_800));
        assert!(parse_ttl("7w").expect_err("weeks").contains("s, m, h or d"));
        assert!(parse_ttl("soon")
            .expect_err("words")
            .contains("not a duration"));
        assert!(parse_ttl("0h").expect_err("zero").contains("positive"));
        assert!(parse_ttl("99999999999999999999d").is_err());
    }
}
