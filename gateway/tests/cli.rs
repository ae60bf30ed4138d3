//! The `dualpath` command as a user runs it: real processes on real files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const BINARY: &str = env!("CARGO_BIN_EXE_dualpath");

/// A config with a store under `dir`: 16 layers of 8 KiB, 128 KiB blocks.
fn write_config(dir: &Path, capacity: &str) -> PathBuf {
    let path = dir.join("gateway.toml");
    let text = format!(
        r#"
[gateway]
cores = 2
[staging]
bytes_per_core = "4MiB"
buffer_bytes = "256KiB"
huge_pages = "off"
[storage]
backend = "uring"
path = "{}"
queue_depth = 16
[[namespace]]
name = "kv"
layers = 16
tokens_per_block = 16
bytes_per_token_per_layer = 512
layout = "layer"
capacity = "{capacity}"
"#,
        dir.join("store").display()
    );
    std::fs::write(&path, text).expect("write config");
    path
}

fn dualpath(config: &Path, args: &[&str]) -> Output {
    Command::new(BINARY)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run dualpath")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `dualpath put` of `block` (through a file next to the config).
fn put_block(config: &Path, namespace: &str, key: &str, block: &[u8]) {
    let path = config.with_file_name("block");
    std::fs::write(&path, block).expect("block file");
    let put = dualpath(
        config,
        &[
            "put",
            "-n",
            namespace,
            "-k",
            key,
            "-i",
            path.to_str().expect("utf-8"),
        ],
    );
    assert!(put.status.success(), "{}", stderr(&put));
}

#[test]
fn put_get_round_trip_and_exit_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "64MiB");
    let block: Vec<u8> = (0..128 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    put_block(&config, "kv", "beef", &block);
    let whole = dualpath(&config, &["get", "-n", "kv", "-k", "beef"]);
    assert!(
        whole.status.success() && whole.stdout == block,
        "{}",
        stderr(&whole)
    );
    let part = dualpath(
        &config,
        &["get", "-n", "kv", "-k", "beef", "--layers", "3..5"],
    );
    assert_eq!(part.stdout, block[3 * 8192..5 * 8192]);

    let missing = dualpath(&config, &["get", "-n", "kv", "-k", "bee"]);
    assert_eq!(missing.status.code(), Some(3));
    assert!(
        stderr(&missing).contains("not found"),
        "{}",
        stderr(&missing)
    );
    let namespace = dualpath(&config, &["get", "-n", "nope", "-k", "beef"]);
    assert_eq!(namespace.status.code(), Some(3));
    assert!(
        stderr(&namespace).contains("unknown namespace \"nope\""),
        "{}",
        stderr(&namespace)
    );

    let short = dualpath(
        &config,
        &[
            "put",
            "-n",
            "kv",
            "-k",
            "1",
            "-i",
            config.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(short.status.code(), Some(1));
    assert!(
        stderr(&short).contains("needs exactly 131072"),
        "{}",
        stderr(&short)
    );

    // rm: the stored key is removed (and stays so), the other is named.
    let removed = dualpath(&config, &["rm", "-n", "kv", "-k", "beef", "bee"]);
    assert_eq!(removed.status.code(), Some(3), "{}", stderr(&removed));
    let said = String::from_utf8_lossy(&removed.stdout);
    assert!(
        said.contains("removed 0000000000000000000000000000beef")
            && said.contains("not stored 00000000000000000000000000000bee"),
        "{said}"
    );
    let gone = dualpath(&config, &["get", "-n", "kv", "-k", "beef"]);
    assert_eq!(gone.status.code(), Some(3), "{}", stderr(&gone));
    let again = dualpath(&config, &["rm", "-n", "kv", "-k", "beef"]);
    assert_eq!(again.status.code(), Some(3));
}

/// A namespace taken out of the config: `check` says it is still in the
/// store; `drop-namespace` refuses one still configured, deletes this one
/// with its files, and says what it freed.
#[test]
fn a_namespace_out_of_the_config_is_dropped_with_its_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "64MiB");
    let kv_only = std::fs::read_to_string(&config).expect("config");
    let with_old = format!(
        "{kv_only}\n{}",
        kv_only[kv_only.find("[[namespace]]").expect("one")..].replace("\"kv\"", "\"old\"")
    );
    std::fs::write(&config, &with_old).expect("two namespaces");
    put_block(&config, "old", "ab", &[7u8; 128 * 1024]);
    let configured = dualpath(&config, &["drop-namespace", "old"]);
    assert_eq!(configured.status.code(), Some(1));
    assert!(
        stderr(&configured).contains("still in the config"),
        "{}",
        stderr(&configured)
    );

    // `stat` finds each namespace by name, whatever the config's order.
    let namespaces_at = kv_only.find("[[namespace]]").expect("one");
    let reordered = format!(
        "{}{}\n{}",
        &kv_only[..namespaces_at],
        &with_old[with_old.rfind("[[namespace]]").expect("old")..],
        &kv_only[namespaces_at..]
    );
    std::fs::write(&config, &reordered).expect("old first");
    let stat = dualpath(&config, &["stat"]);
    let said = String::from_utf8_lossy(&stat.stdout);
    assert!(
        said.contains("namespace old: 1 of ") && said.contains("namespace kv: 0 of "),
        "{said}"
    );

    std::fs::write(&config, &kv_only).expect("old taken out");
    let stat = dualpath(&config, &["stat"]);
    let said = String::from_utf8_lossy(&stat.stdout);
    assert!(
        said.contains("namespace old: 1 blocks, not in the config"),
        "{said}"
    );
    let check = dualpath(&config, &["check"]);
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(
        said.lines().any(|line| line.starts_with("warn")
            && line.contains("[\"old\"] are in the store but not in the config")),
        "{said}"
    );
    let dropped = dualpath(&config, &["drop-namespace", "old"]);
    assert!(dropped.status.success(), "{}", stderr(&dropped));
    // 64 MiB of slots and their header records (the file system's
    // allocation, as `du` counts it).
    let said = String::from_utf8_lossy(&dropped.stdout);
    assert!(
        said.starts_with("dropped namespace \"old\": ") && said.trim_end().ends_with("freed"),
        "{said}"
    );
    assert!(!dir.path().join("store/old").exists());
    let again = dualpath(&config, &["drop-namespace", "old"]);
    assert_eq!(again.status.code(), Some(3), "{}", stderr(&again));
    let stat = dualpath(&config, &["stat"]);
    assert!(stat.status.success(), "{}", stderr(&stat));
    assert!(!String::from_utf8_lossy(&stat.stdout).contains("old"));
}

#[test]
fn config_typo_names_the_key_and_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "64MiB");
    let text = std::fs::read_to_string(&config)
        .expect("config")
        .replace("queue_depth", "queue_dept");
    std::fs::write(&config, text).expect("rewrite");
    let output = dualpath(&config, &["stat"]);
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(
        message.contains("queue_dept") && message.contains("gateway.toml"),
        "{message}"
    );
}

#[test]
fn corrupt_block_on_disk_fails_verify_with_exit_4_and_is_dropped_when_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "64MiB");
    let import = dualpath(
        &config,
        &["import", "-n", "kv", "--synthetic", "50", "--seed", "3"],
    );
    assert!(import.status.success(), "{}", stderr(&import));
    let data = dir.path().join("store/kv/shard-0.blocks");
    let mut bytes = std::fs::read(&data).expect("data file");
    bytes[5000] ^= 1;
    std::fs::write(&data, bytes).expect("write back");
    let verify = dualpath(&config, &["verify", "--synthetic-seed", "3"]);
    assert_eq!(verify.status.code(), Some(4), "{}", stderr(&verify));
    assert!(String::from_utf8_lossy(&verify.stdout).contains("49 blocks ok, 1 corrupt,"));
    // Asked to, verify takes the corrupt block out of the store; the next
    // verify finds the store whole, one block short.
    let dropping = dualpath(
        &config,
        &["verify", "--synthetic-seed", "3", "--drop-corrupt"],
    );
    assert_eq!(dropping.status.code(), Some(4), "{}", stderr(&dropping));
    assert!(
        String::from_utf8_lossy(&dropping.stdout)
            .contains("49 blocks ok, 1 corrupt (1 taken out of the store)"),
        "{}",
        String::from_utf8_lossy(&dropping.stdout)
    );
    assert!(
        stderr(&dropping).contains("taken out of the store"),
        "{}",
        stderr(&dropping)
    );
    let after = dualpath(&config, &["verify", "--synthetic-seed", "3"]);
    assert!(after.status.success(), "{}", stderr(&after));
    assert!(String::from_utf8_lossy(&after.stdout).contains("49 blocks ok, 0 corrupt,"));
}

/// kill -9 in the middle of bulk puts (with eviction going on), restart, and
/// every block that reads back holds exactly what was written: none is torn.
#[test]
fn kill_9_during_bulk_import_never_leaves_a_torn_block() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Room for about 400 of the 3,000 blocks: slots are reused while writing.
    let config = write_config(dir.path(), "52MiB");
    for (round, delay_ms) in [120u64, 260, 410, 90, 330].into_iter().enumerate() {
        let mut child = Command::new(BINARY)
            .arg("--config")
            .arg(&config)
            .args(["import", "-n", "kv", "--synthetic", "3000", "--seed", "11"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn import");
        std::thread::sleep(Duration::from_millis(delay_ms));
        assert!(
            child.try_wait().expect("poll").is_none(),
            "round {round}: import finished before the kill"
        );
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        let verify = dualpath(&config, &["verify", "--synthetic-seed", "11"]);
        let report = String::from_utf8_lossy(&verify.stdout).into_owned();
        assert!(
            verify.status.success(),
            "round {round}: {report} {}",
            stderr(&verify)
        );
        assert!(
            report.contains("0 corrupt, 0 with wrong contents"),
            "round {round}: {report}"
        );
    }
    let stat = dualpath(&config, &["stat"]);
    assert!(
        String::from_utf8_lossy(&stat.stdout).contains("namespace kv"),
        "{}",
        stderr(&stat)
    );
}

#[test]
fn a_secret_file_readable_by_others_is_refused_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "64MiB");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef").expect("secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let text = std::fs::read_to_string(&config).expect("config").replace(
        "cores = 2",
        &format!("cores = 2\nauth_secret_file = \"{}\"", secret.display()),
    );
    std::fs::write(&config, text).expect("rewrite");
    let output = dualpath(&config, &["serve"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("chmod 600"), "{}", stderr(&output));
}

/// `check` runs every step `serve` takes before it serves, one line each,
/// creates nothing, and fails (exit 1) naming each thing that would stop
/// the gateway, with the others still reported.
#[test]
fn check_reports_every_step_and_fails_on_what_would_stop_serve() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "64MiB");
    let text = std::fs::read_to_string(&config).expect("config");
    let listen = |address: &str, extra: &str| {
        let gateway = format!("[gateway]\nlisten_tcp = \"{address}\"\n{extra}");
        std::fs::write(&config, text.replacen("[gateway]\n", &gateway, 1)).expect("config");
    };
    listen("127.0.0.1:0", "");
    let stdout = |output: &Output| String::from_utf8_lossy(&output.stdout).into_owned();

    let fresh = dualpath(&config, &["check"]);
    let report = stdout(&fresh);
    assert!(fresh.status.success(), "{report}{}", stderr(&fresh));
    for line in [
        "ok    config: 2 cores, namespaces kv",
        "ok    listen: tcp 127.0.0.1:",
        "ok    staging: 2 x 4MiB locked",
        "warn  store: no store at",
        "check: 0 problems",
    ] {
        assert!(report.contains(line), "{line:?} in:\n{report}");
    }
    assert!(!dir.path().join("store").exists(), "check creates no store");

    let import = dualpath(&config, &["import", "-n", "kv", "--synthetic", "4"]);
    assert!(import.status.success(), "{}", stderr(&import));
    let report = stdout(&dualpath(&config, &["check"]));
    assert!(
        report.contains("ok    store: 2 shards open") && report.contains("4 blocks stored"),
        "{report}"
    );

    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let address = busy.local_addr().expect("address").to_string();
    listen(
        &address,
        &format!(
            "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
            dir.path().join("missing.crt").display(),
            dir.path().join("missing.key").display()
        ),
    );
    let failing = dualpath(&config, &["check"]);
    let report = stdout(&failing);
    assert_eq!(failing.status.code(), Some(1), "{report}");
    for line in [
        "FAIL  listen: cannot listen on",
        "another process listens there",
        "FAIL  tls: cannot read the TLS certificate file",
        "ok    store: 2 shards open",
        "check: 2 problems",
    ] {
        assert!(report.contains(line), "{line:?} in:\n{report}");
    }
    assert!(
        stderr(&failing).contains("`serve` would not start"),
        "{}",
        stderr(&failing)
    );
}

/// The systemd unit shipped in `config/` is one systemd accepts (pointed at
/// this build's binary and a config of ours: `systemd-analyze verify`), and
/// the check it runs before each start passes on that config. Skipped, with
/// the reason printed, where systemd is not installed.
#[test]
fn the_systemd_unit_verifies_and_its_start_check_passes() {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/dualpath-gateway.service"),
    )
    .expect("the unit");
    let Ok(analyze) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("skipped: systemd-analyze is not installed (apt-get install systemd)");
        return;
    };
    assert!(analyze.status.success());
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "8MiB");
    let text = std::fs::read_to_string(&config).expect("the config");
    let text = text.replace("cores = 2", "cores = 2\nlisten_tcp = \"127.0.0.1:0\"");
    std::fs::write(&config, text).expect("listening");
    let ours = unit.replace("/usr/local/bin/dualpath", BINARY).replace(
        "/etc/dualpath/gateway.toml",
        config.to_str().expect("utf-8"),
    );
    assert_ne!(ours, unit, "the unit names the binary and the config");
    let path = dir.path().join("dualpath-gateway.service");
    std::fs::write(&path, &ours).expect("write the unit");
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze runs");
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        stderr(&verify)
    );
    let start_check = ours
        .lines()
        .find_map(|line| line.strip_prefix("ExecStartPre="))
        .expect("a check before the start");
    let words: Vec<&str> = start_check.split_whitespace().collect();
    let check = Command::new(words[0])
        .args(&words[1..])
        .output()
        .expect("the check runs");
    assert!(check.status.success(), "{}", stderr(&check));
}
