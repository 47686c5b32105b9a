//! SSH into a running sandbox, with no sshd in the image: an SSH server endpoint on the
//! host ([`Sandbox::ssh_server`]) whose sessions are commands, PTY shells and SFTP in the
//! guest through the agent, so `ssh`, `scp`, `sftp` and editors' remote modes work; and
//! an in-process client ([`Sandbox::open_client`]) for programs.
//!
//! The endpoint listens on 127.0.0.1 only, on the port the caller picks or one it is given.
//! Its host key is the sandbox's own, made once and kept with the sandbox's files (owner
//! only), so `known_hosts` stays valid across restarts. Only public keys the caller
//! authorises get in; the login name is the guest user commands run as (`root` or any
//! other the image has). File transfers (SFTP) run as root in the guest whatever the login.
//! Built on russh and russh-sftp.

mod client;
mod keys;
mod server;
mod sftp;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use russh::keys::{HashAlg, PrivateKey, PublicKey};
use russh::server::Config;
use russh::MethodKind;
use tokio::net::TcpListener;

use crate::error::{MicrosandboxError, MicrosandboxResult};
use crate::sandbox::Sandbox;

pub use client::{SshClient, SshOutput};

/// Connections one endpoint serves at once (logged in or not); more are closed at once.
const MAX_CONNECTIONS: usize = 32;

/// How an SSH endpoint is set up ([`Sandbox::ssh_server`]).
#[derive(Debug, Clone, Default)]
pub struct SshOptions {
    port: u16,
    keys: Vec<PublicKey>,
    client_key_files: Vec<std::path::PathBuf>,
}

impl SshOptions {
    /// Defaults: a port the system assigns, no authorised key (add at least one).
    pub fn new() -> Self {
        SshOptions::default()
    }

    /// Listen on this port of 127.0.0.1 (0, the default: one the system assigns).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Authorises the keys in `text` (OpenSSH `authorized_keys` format: one per line, such
    /// as the contents of `id_ed25519.pub`; `#` comments and options are allowed).
    pub fn authorized_keys(mut self, text: &str) -> MicrosandboxResult<Self> {
        self.keys.extend(keys::parse_authorized_keys(text)?);
        Ok(self)
    }

    /// Authorises the keys in the file `path` (`authorized_keys` format).
    pub fn authorized_keys_file(self, path: impl AsRef<Path>) -> MicrosandboxResult<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            MicrosandboxError::InvalidConfig(format!("cannot read {}: {e}", path.display()))
        })?;
        self.authorized_keys(&text)
    }

    /// Authorises one public key.
    pub fn authorized_key(mut self, key: PublicKey) -> Self {
        self.keys.push(key);
        self
    }

    /// Makes a fresh key pair when the endpoint starts, writes its private half to `path`
    /// (OpenSSH format, mode 0600; the file must not exist) and authorises it: what a
    /// program such as `ssh -i PATH` needs to get in.
    pub fn client_key_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.client_key_files.push(path.into());
        self
    }
}

/// A running SSH endpoint of a sandbox. It serves until [`SshEndpoint::shutdown`] or until
/// it is dropped (which ends its sessions too).
pub struct SshEndpoint {
    addr: SocketAddr,
    host_key: PublicKey,
    state: Arc<server::ServerState>,
    sessions: Arc<Mutex<server::Sessions>>,
    accept: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for SshEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshEndpoint")
            .field("addr", &self.addr)
            .field("host_key", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// The server configuration every endpoint uses.
fn server_config(host_key: PrivateKey) -> Arc<Config> {
    Arc::new(Config {
        keys: vec![host_key],
        methods: (&[MethodKind::PublicKey][..]).into(),
        // OpenSSH probes with "none" first: no delay for that, a second per wrong key.
        auth_rejection_time_initial: Some(Duration::ZERO),
        auth_rejection_time: Duration::from_secs(1),
        // Shells sit idle for hours; keepalives find the clients that are gone.
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 3,
        nodelay: true,
        ..Config::default()
    })
}

impl Sandbox {
    /// Starts an SSH endpoint for this sandbox on 127.0.0.1 (see the [module](crate::ssh)
    /// documentation): `ssh -p PORT root@127.0.0.1` with an authorised key runs a shell
    /// in the guest. At least one key must be authorised.
    pub async fn ssh_server(&self, mut opts: SshOptions) -> MicrosandboxResult<SshEndpoint> {
        for path in &opts.client_key_files {
            let key = keys::generate()?;
            keys::write_private_key(&key, path).map_err(|e| {
                MicrosandboxError::InvalidConfig(format!(
                    "cannot write the client key {}: {e}",
                    path.display()
                ))
            })?;
            opts.keys.push(key.public_key().clone());
        }
        if opts.keys.is_empty() {
            return Err(MicrosandboxError::InvalidConfig(
                "an SSH endpoint needs at least one authorized key".into(),
            ));
        }
        if opts.keys.len() > keys::MAX_AUTHORIZED_KEYS {
            return Err(MicrosandboxError::InvalidConfig(format!(
                "more than {} authorized keys",
                keys::MAX_AUTHORIZED_KEYS
            )));
        }
        let host = self.ssh_host_key()?;
        let host_key = host.public_key().clone();
        let config = server_config(host);
        let listener = TcpListener::bind(("127.0.0.1", opts.port))
            .await
            .map_err(|e| {
                MicrosandboxError::InvalidConfig(format!(
                    "cannot listen on 127.0.0.1:{}: {e}",
                    opts.port
                ))
            })?;
        let addr = listener.local_addr()?;
        let state = Arc::new(server::ServerState {
            sb: self.clone(),
            keys: RwLock::new(opts.keys),
        });
        let sessions = Arc::new(Mutex::new(server::Sessions::default()));
        let accept = tokio::spawn(accept_loop(
            listener,
            config,
            state.clone(),
            sessions.clone(),
        ));
        Ok(SshEndpoint {
            addr,
            host_key,
            state,
            sessions,
            accept,
        })
    }

    /// An SSH client connected in-process to this sandbox (no port, no key files): the
    /// reference's `sb.SSH()`. Its sessions run as `root`.
    pub async fn open_client(&self) -> MicrosandboxResult<SshClient> {
        let host = self.ssh_host_key()?;
        let host_key = host.public_key().clone();
        let key = keys::generate()?;
        let state = Arc::new(server::ServerState {
            sb: self.clone(),
            keys: RwLock::new(vec![key.public_key().clone()]),
        });
        SshClient::over_duplex(server_config(host), state, host_key, key, "root").await
    }

    /// The sandbox's host key (made on first use).
    fn ssh_host_key(&self) -> MicrosandboxResult<PrivateKey> {
        keys::load_or_create_host_key(&self.paths().dir.join("ssh_host_ed25519_key"))
    }
}

/// How long a client has from its connection to a successful login.
const LOGIN_DEADLINE: Duration = Duration::from_secs(30);

async fn accept_loop(
    listener: TcpListener,
    config: Arc<Config>,
    state: Arc<server::ServerState>,
    sessions: Arc<Mutex<server::Sessions>>,
) {
    // A slot per connection from its accept (logged in or not) to its end.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let (config, state, sessions) = (config.clone(), state.clone(), sessions.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let conn = server::Connection::new(state);
            let authenticated = conn.authenticated.clone();
            let started = tokio::time::timeout(
                LOGIN_DEADLINE,
                russh::server::run_stream(config, stream, conn),
            )
            .await;
            let Ok(Ok(running)) = started else {
                return;
            };
            let handle = running.handle();
            let Some(id) = sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .add(handle.clone())
            else {
                // The endpoint was shut down meanwhile.
                disconnect_all(vec![handle]).await;
                return;
            };
            let deadline = tokio::spawn(async move {
                tokio::time::sleep(LOGIN_DEADLINE).await;
                if !authenticated.load(std::sync::atomic::Ordering::SeqCst) {
                    disconnect_all(vec![handle]).await;
                }
            });
            let _ = running.await;
            deadline.abort();
            sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(id);
        });
    }
}

impl SshEndpoint {
    /// Where it listens (127.0.0.1 and its port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The sandbox's host public key.
    pub fn host_key(&self) -> &PublicKey {
        &self.host_key
    }

    /// The host key's fingerprint as `ssh` prints it (`SHA256:...`).
    pub fn fingerprint(&self) -> String {
        self.host_key.fingerprint(HashAlg::Sha256).to_string()
    }

    /// A `known_hosts` line for this endpoint (`[127.0.0.1]:PORT ssh-ed25519 ...`).
    pub fn known_hosts_line(&self) -> String {
        let mut key = self.host_key.clone();
        key.set_comment("");
        let text = key.to_openssh().unwrap_or_default();
        format!("[127.0.0.1]:{} {}", self.port(), text.trim_end())
    }

    /// Authorises another key from now on (at most 1024 in all).
    pub fn authorize(&self, key: PublicKey) -> MicrosandboxResult<()> {
        let mut keys = self.state.keys.write().unwrap_or_else(|p| p.into_inner());
        if keys.len() >= keys::MAX_AUTHORIZED_KEYS {
            return Err(MicrosandboxError::InvalidConfig(format!(
                "more than {} authorized keys",
                keys::MAX_AUTHORIZED_KEYS
            )));
        }
        keys.push(key);
        Ok(())
    }

    /// A client connected to this endpoint over TCP with a fresh key it authorises.
    pub async fn open_client(&self, user: &str) -> MicrosandboxResult<SshClient> {
        let key = keys::generate()?;
        self.authorize(key.public_key().clone())?;
        SshClient::over_tcp(self.addr, self.host_key.clone(), key, user).await
    }

    /// Stops listening and ends every session.
    pub async fn shutdown(self) {
        disconnect_all(self.stop_accepting()).await;
    }

    /// Stops the accept loop; the sessions still open.
    fn stop_accepting(&self) -> Vec<russh::server::Handle> {
        self.accept.abort();
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .close()
    }
}

async fn disconnect_all(live: Vec<russh::server::Handle>) {
    for h in live {
        let _ = h
            .disconnect(
                russh::Disconnect::ByApplication,
                "the endpoint was shut down".into(),
                "en".into(),
            )
            .await;
    }
}

impl Drop for SshEndpoint {
    fn drop(&mut self) {
        let live = self.stop_accepting();
        if live.is_empty() {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(disconnect_all(live));
        }
    }
}

#[cfg(test)]
mod tests {
    use msb_protocol::message::Message;

    use super::*;

    fn exited(code: Option<i32>, signal: Option<i32>) -> Message {
        Message::Exited {
            code,
            signal,
            timed_out: false,
        }
    }

    #[tokio::test]
    async fn a_command_over_the_in_process_client_keeps_its_streams_and_status() {
        let (dir, control) = crate::fake_agent::serve_once(vec![
            Message::Started { pid: 3 },
            Message::Stdout(b"out\n".to_vec()),
            Message::Stderr(b"err\n".to_vec()),
            exited(Some(7), None),
        ]);
        let sb = Sandbox::over_control_socket("ssh-test", control);
        let client = sb.open_client().await.expect("connects");
        let out = client
            .exec("echo out; echo err >&2; exit 7")
            .await
            .expect("runs");
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!((out.exit_status, out.exit_signal), (Some(7), None));
        // The host key was made beside the sandbox's files, owner only, and is kept.
        let key = dir.path().join("ssh_host_ed25519_key");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&key).expect("host key").permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        client.close().await.expect("closes");
    }

    #[tokio::test]
    async fn a_command_killed_by_a_signal_reports_the_signal() {
        let (_dir, control) = crate::fake_agent::serve_once(vec![
            Message::Started { pid: 3 },
            exited(None, Some(15)),
        ]);
        let sb = Sandbox::over_control_socket("ssh-test", control);
        let out = sb
            .open_client()
            .await
            .expect("connects")
            .exec("sleep 100")
            .await
            .expect("runs");
        assert_eq!(out.exit_status, None);
        assert_eq!(out.exit_signal.as_deref(), Some("TERM"));
    }

    #[tokio::test]
    async fn the_endpoint_needs_a_key_and_refuses_others() {
        let (dir, control) = crate::fake_agent::serve_once(Vec::new());
        let sb = Sandbox::over_control_socket("ssh-test", control);
        assert!(matches!(
            sb.ssh_server(SshOptions::new()).await,
            Err(MicrosandboxError::InvalidConfig(_))
        ));
        let allowed = keys::generate().expect("key");
        let ep = sb
            .ssh_server(SshOptions::new().authorized_key(allowed.public_key().clone()))
            .await
            .expect("listens");
        assert!(ep.addr().ip().is_loopback() && ep.port() != 0);
        assert!(
            ep.known_hosts_line()
                .starts_with(&format!("[127.0.0.1]:{} ssh-ed25519 ", ep.port())),
            "{}",
            ep.known_hosts_line()
        );
        assert!(ep.fingerprint().starts_with("SHA256:"));
        // A key nobody authorised is refused.
        let stranger = keys::generate().expect("key");
        let refused = SshClient::over_tcp(ep.addr(), ep.host_key().clone(), stranger, "root").await;
        assert!(refused.is_err(), "a stranger's key got in");
        // The authorised one gets in; a client that expects another host key does not.
        SshClient::over_tcp(ep.addr(), ep.host_key().clone(), allowed.clone(), "root")
            .await
            .expect("the authorised key gets in");
        let other_host = keys::generate().expect("key");
        assert!(
            SshClient::over_tcp(ep.addr(), other_host.public_key().clone(), allowed, "root")
                .await
                .is_err(),
            "a wrong host key was accepted"
        );
        ep.shutdown().await;
        drop(dir);
    }
}
