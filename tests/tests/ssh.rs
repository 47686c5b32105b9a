//! SSH into one booted sandbox, with Debian's OpenSSH client against the SDK's endpoint
//! (no sshd in the image): a command with its streams and exit code, a PTY command and a
//! PTY shell fed from stdin, an `scp` round trip of a 5 MiB file, a wrong key refused;
//! then the in-process client (`open_client`: a command, an SFTP listing) and `msb ssh`.
//! Everything stays on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use microsandbox::{Sandbox, SshEndpoint, SshOptions};
use msb_e2e::{host_kind, sdk_env};
use sha2::{Digest, Sha256};

fn check(name: &str, start: Instant) {
    msb_e2e::check("ssh", name, start);
}

#[test]
fn ssh() {
    let home = tempfile::tempdir().expect("tempdir");
    sdk_env(home.path());
    msb_e2e::block_on_within(Duration::from_secs(1500), run_all());
}

/// `ssh`/`scp` with only this test's files: its key, its known_hosts, no agent, no config.
struct Client {
    dir: PathBuf,
    port: u16,
}

impl Client {
    fn common(&self, key: &str, port_flag: &str) -> Vec<String> {
        let d = |f: &str| self.dir.join(f).display().to_string();
        [
            "-F",
            "/dev/null",
            "-i",
            &d(key),
            port_flag,
            &self.port.to_string(),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "IdentityAgent=none",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            &format!("UserKnownHostsFile={}", d("known_hosts")),
        ]
        .into_iter()
        .map(String::from)
        .collect()
    }

    /// `ssh [extra] root@127.0.0.1 command` (async: the endpoint serves on this runtime).
    async fn ssh(&self, key: &str, extra: &[&str], command: &str, stdin: &[u8]) -> Output {
        let mut cmd = tokio::process::Command::new("ssh");
        cmd.args(self.common(key, "-p"))
            .args(extra)
            .arg("root@127.0.0.1");
        if !command.is_empty() {
            cmd.arg(command);
        }
        run(cmd, stdin).await
    }

    async fn scp(&self, from: &str, to: &str) -> Output {
        let mut cmd = tokio::process::Command::new("scp");
        cmd.args(self.common("id", "-P")).args(["-q", from, to]);
        run(cmd, b"").await
    }
}

async fn run(mut cmd: tokio::process::Command, stdin: &[u8]) -> Output {
    use tokio::io::AsyncWriteExt;
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .expect("the OpenSSH client runs (scripts/setup installs it)");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin).await.expect("stdin");
    drop(input);
    tokio::time::timeout(Duration::from_secs(300), child.wait_with_output())
        .await
        .expect("the client ends within 300 s")
        .expect("output")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn keygen(path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen runs");
    assert!(out.status.success(), "{out:?}");
}

async fn run_all() {
    eprintln!("ssh e2e: host kind {}", host_kind());
    let t = Instant::now();
    let sb = Sandbox::builder("ssh-e2e").create().await.expect("boots");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    keygen(&dir.join("id"));
    keygen(&dir.join("wrong"));
    let ep: SshEndpoint = sb
        .ssh_server(
            SshOptions::new()
                .authorized_keys_file(dir.join("id.pub"))
                .expect("the key file parses"),
        )
        .await
        .expect("the endpoint starts");
    std::fs::write(
        dir.join("known_hosts"),
        format!("{}\n", ep.known_hosts_line()),
    )
    .expect("known_hosts");
    let c = Client {
        dir: dir.clone(),
        port: ep.port(),
    };
    eprintln!("  endpoint {} host key {}", ep.addr(), ep.fingerprint());
    check("boot and an endpoint on 127.0.0.1", t);

    let t = Instant::now();
    let out = c
        .ssh("id", &[], "echo out; echo err >&2; exit 7", b"")
        .await;
    assert_eq!(text(&out.stdout), "out\n", "{out:?}");
    assert_eq!(text(&out.stderr), "err\n", "{out:?}");
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    check("ssh CMD: stdout, stderr and exit code 7", t);

    let t = Instant::now();
    let out = c.ssh("id", &["-tt"], "tty; echo TERM=$TERM", b"").await;
    let s = text(&out.stdout);
    assert!(s.contains("/dev/pts/"), "{out:?}");
    assert!(s.contains("TERM="), "{out:?}");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = c
        .ssh("id", &["-tt"], "", b"echo hi-from-pty\nexit 3\n")
        .await;
    assert!(text(&out.stdout).contains("hi-from-pty"), "{out:?}");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    check(
        "ssh -tt: a command on a PTY, a PTY shell fed from stdin (exit 3)",
        t,
    );

    let t = Instant::now();
    let big: Vec<u8> = msb_e2e::noise(21, 5 << 20);
    std::fs::write(dir.join("big"), &big).expect("write");
    let out = c
        .scp(
            &dir.join("big").display().to_string(),
            "root@127.0.0.1:/tmp/big",
        )
        .await;
    assert!(out.status.success(), "scp up: {out:?}");
    let guest = sb
        .shell("sha256sum /tmp/big")
        .await
        .expect("sha256sum")
        .stdout()
        .expect("utf-8");
    let host = hex::encode(Sha256::digest(&big));
    assert!(guest.starts_with(&host), "guest {guest} host {host}");
    let back = dir.join("back");
    let out = c
        .scp("root@127.0.0.1:/tmp/big", &back.display().to_string())
        .await;
    assert!(out.status.success(), "scp down: {out:?}");
    assert!(
        std::fs::read(&back).expect("read back") == big,
        "the copy differs"
    );
    check(
        "scp: 5 MiB up (same sha256 in the guest) and back (same bytes)",
        t,
    );

    let t = Instant::now();
    let out = c.ssh("wrong", &[], "echo no", b"").await;
    assert_eq!(out.status.code(), Some(255), "{out:?}");
    assert!(
        text(&out.stderr).contains("Permission denied (publickey)"),
        "{out:?}"
    );
    assert!(out.stdout.is_empty());
    check("a key that is not authorised is refused", t);

    let t = Instant::now();
    let client = sb.open_client().await.expect("in-process client");
    let out = client.exec("echo in-process; exit 4").await.expect("exec");
    assert_eq!(text(&out.stdout), "in-process\n");
    assert_eq!(out.exit_status, Some(4));
    let sftp = client.sftp().await.expect("sftp");
    let names: Vec<String> = sftp
        .read_dir("/tmp")
        .await
        .expect("read_dir")
        .map(|e| e.file_name())
        .collect();
    assert!(names.iter().any(|n| n == "big"), "{names:?}");
    client.close().await.expect("close");
    check("open_client: a command (exit 4), an SFTP listing", t);

    let t = Instant::now();
    let out = tokio::process::Command::new(msb_e2e::msb_cli())
        .args(["ssh", "ssh-e2e", "--", "echo", "via-msb"])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("msb runs");
    assert_eq!(text(&out.stdout), "via-msb\n", "{out:?}");
    assert!(out.status.success(), "{out:?}");
    check("msb ssh NAME -- CMD", t);

    ep.shutdown().await;
    sb.stop().await.expect("stop");
    Sandbox::remove("ssh-e2e").await.expect("remove");
}
