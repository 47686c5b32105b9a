//! A real OCI registry for the tests: Debian's `docker-registry` (distribution) on
//! 127.0.0.1 with storage in a temporary directory, optionally behind htpasswd basic
//! auth; a push of test-built images over the registry's HTTP API; the registry's access
//! log, to count what clients fetched; and a throttling TCP proxy, to catch a pull in the
//! middle of a layer.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use microsandbox::image::fixture::ImageFixture;

/// The registry binary the Debian package installs.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A running registry, killed on drop.
pub struct Registry {
    /// `127.0.0.1:<port>`.
    pub addr: String,
    storage: tempfile::TempDir,
    log: PathBuf,
    child: Child,
    auth: Option<(String, String)>,
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Registry {
    /// Starts a registry; with `auth`, every request needs that user and password.
    pub fn start(auth: Option<(&str, &str)>) -> Registry {
        assert!(
            Path::new(REGISTRY_BIN).exists(),
            "{REGISTRY_BIN} is missing: scripts/setup installs the docker-registry package"
        );
        let storage = tempfile::tempdir().expect("registry storage");
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut auth_section = String::new();
        if let Some((user, password)) = auth {
            let hash = bcrypt::hash_with_result(password, 4)
                .expect("bcrypt")
                .format_for_version(bcrypt::Version::TwoY);
            let htpasswd = storage.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{user}:{hash}\n")).expect("htpasswd");
            auth_section = format!(
                "auth:\n  htpasswd:\n    realm: msb-test\n    path: {}\n",
                htpasswd.display()
            );
        }
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: {addr}\n  secret: msb-test-secret\n{auth_section}",
            storage.path().join("data").display()
        );
        let config_path = storage.path().join("config.yml");
        std::fs::write(&config_path, config).expect("registry config");
        let log = storage.path().join("registry.log");
        let log_file = std::fs::File::create(&log).expect("registry log");
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .expect("docker-registry starts");
        let registry = Registry {
            addr,
            storage,
            log,
            child,
            auth: auth.map(|(u, p)| (u.to_string(), p.to_string())),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((status, _)) = registry.request("GET", "/v2/", &[], &[]) {
                if status == 200 || status == 401 {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the registry did not start: {}",
                std::fs::read_to_string(&registry.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    /// One HTTP/1.1 request (with this registry's credentials); the status and body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<(u16, Vec<u8>)> {
        self.request_full(method, path, headers, body)
            .map(|(status, _, body)| (status, body))
    }

    /// [`Registry::request`], also returning the response header block.
    fn request_full(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<(u16, String, Vec<u8>)> {
        let mut stream = TcpStream::connect(&self.addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some((user, password)) = &self.auth {
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            head.push_str(&format!("Authorization: Basic {token}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| std::io::Error::other("no HTTP header"))?;
        let head = String::from_utf8_lossy(&response[..split]).to_string();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
        Ok((status, head, response[split + 4..].to_vec()))
    }

    /// Uploads one blob: an upload session, then one PUT of all of it.
    pub fn push_blob(&self, repo: &str, digest: &str, data: &[u8]) {
        let (status, head, body) = self
            .request_full("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], &[])
            .expect("blob upload");
        assert_eq!(
            status,
            202,
            "blob upload: {}",
            String::from_utf8_lossy(&body)
        );
        let location = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("location")
                    .then(|| v.trim().to_string())
            })
            .expect("upload location");
        // The location may be absolute: keep its path and query.
        let path = match location.find("/v2/") {
            Some(at) => location[at..].to_string(),
            None => location,
        };
        let sep = if path.contains('?') { '&' } else { '?' };
        let (status, _, body) = self
            .request_full(
                "PUT",
                &format!("{path}{sep}digest={digest}"),
                &[("Content-Type", "application/octet-stream")],
                data,
            )
            .expect("blob upload");
        assert_eq!(
            status,
            201,
            "blob upload: {}",
            String::from_utf8_lossy(&body)
        );
    }

    /// Puts a manifest or index under `reference` (a tag or a digest).
    pub fn push_manifest(&self, repo: &str, reference: &str, media_type: &str, body: &[u8]) {
        let (status, resp) = self
            .request(
                "PUT",
                &format!("/v2/{repo}/manifests/{reference}"),
                &[("Content-Type", media_type)],
                body,
            )
            .expect("manifest upload");
        assert_eq!(
            status,
            201,
            "manifest upload: {}",
            String::from_utf8_lossy(&resp)
        );
    }

    /// Pushes a test image as `repo:tag`; returns its manifest digest.
    pub fn push(&self, repo: &str, tag: &str, image: &ImageFixture) -> String {
        let digest = self.push_blobs(repo, image);
        let blobs = image.blobs().expect("fixture blobs");
        self.push_manifest(
            repo,
            tag,
            "application/vnd.oci.image.manifest.v1+json",
            &blobs.manifest.1,
        );
        digest
    }

    /// Pushes a test image's blobs and manifest (by digest, untagged); returns the digest.
    pub fn push_blobs(&self, repo: &str, image: &ImageFixture) -> String {
        let blobs = image.blobs().expect("fixture blobs");
        self.push_blob(repo, &blobs.config.0, &blobs.config.1);
        for (digest, data, _) in &blobs.layers {
            self.push_blob(repo, digest, data);
        }
        self.push_manifest(
            repo,
            &blobs.manifest.0,
            "application/vnd.oci.image.manifest.v1+json",
            &blobs.manifest.1,
        );
        blobs.manifest.0
    }

    /// Pushes images for several platforms and an index of them as `repo:tag`; returns
    /// the index digest.
    pub fn push_index(&self, repo: &str, tag: &str, images: &[(&str, &ImageFixture)]) -> String {
        let mut manifests = Vec::new();
        for (arch, image) in images {
            let blobs = image.blobs().expect("fixture blobs");
            self.push_blobs(repo, image);
            manifests.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": blobs.manifest.0,
                "size": blobs.manifest.1.len(),
                "platform": {"os": "linux", "architecture": arch},
            }));
        }
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        }))
        .expect("index json");
        self.push_manifest(repo, tag, "application/vnd.oci.image.index.v1+json", &index);
        microsandbox::image::fixture::sha256_digest(&index)
    }

    /// The file the registry serves a blob from (to tamper with it).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// How many successful GETs of `/v2/<repo>/<kind>/<name>` the access log has (`kind`
    /// is `blobs` or `manifests`).
    pub fn gets(&self, repo: &str, kind: &str, name: &str) -> usize {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let wanted = format!("\"GET /v2/{repo}/{kind}/{name} ");
        log.lines()
            .filter(|l| {
                l.find(&wanted).is_some_and(|at| {
                    let rest = &l[at + wanted.len()..];
                    let status = rest
                        .split('"')
                        .nth(1)
                        .unwrap_or("")
                        .split_whitespace()
                        .next();
                    matches!(status, Some("200") | Some("206"))
                })
            })
            .count()
    }

    /// Every request line in the access log (for messages).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"GET ") || l.contains("\"HEAD "))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy on 127.0.0.1 that forwards to a target, passing at most `rate` bytes a
/// second from the target back to the client. Counts those bytes.
pub struct SlowProxy {
    /// `127.0.0.1:<port>`.
    pub addr: String,
    /// Bytes sent from the target to clients so far.
    pub bytes: Arc<AtomicU64>,
}

impl SlowProxy {
    /// Starts the proxy (threads; it lives as long as the test process).
    pub fn start(target: &str, rate: u64) -> SlowProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy port");
        let addr = listener.local_addr().expect("addr").to_string();
        let bytes = Arc::new(AtomicU64::new(0));
        let target = target.to_string();
        let counter = bytes.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let (mut c_read, mut s_write) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_read, &mut s_write);
                    let _ = s_write.shutdown(std::net::Shutdown::Write);
                });
                let counter = counter.clone();
                let (mut s_read, mut c_write) = (server, client);
                std::thread::spawn(move || {
                    let chunk = (rate / 20).max(1) as usize;
                    let mut buf = vec![0u8; chunk];
                    loop {
                        let started = Instant::now();
                        let n = match s_read.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if c_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                        let due = Duration::from_secs_f64(n as f64 / rate as f64);
                        if let Some(wait) = due.checked_sub(started.elapsed()) {
                            std::thread::sleep(wait);
                        }
                    }
                    let _ = c_write.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        SlowProxy { addr, bytes }
    }
}
