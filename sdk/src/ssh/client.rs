//! The in-process SSH client ([`Sandbox::open_client`](crate::Sandbox::open_client),
//! [`SshEndpoint::open_client`](super::SshEndpoint::open_client)): it knows the sandbox's
//! host key, so it checks the server without a `known_hosts` file.

use std::net::SocketAddr;
use std::sync::Arc;

use russh::client::{self, Msg};
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{Channel, ChannelMsg};

use crate::error::{MicrosandboxError, MicrosandboxResult};
use crate::ssh::server::{Connection, ServerState};

/// What one command run through [`SshClient::exec`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SshOutput {
    /// Its stdout.
    pub stdout: Vec<u8>,
    /// Its stderr.
    pub stderr: Vec<u8>,
    /// Its exit status, when it exited.
    pub exit_status: Option<u32>,
    /// The signal that ended it (`TERM`, `KILL`, ...), when one did.
    pub exit_signal: Option<String>,
}

/// Checks the server's key against the one expected.
struct Expect(PublicKey);

impl client::Handler for Expect {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.key_data() == self.0.key_data(),
            PublicKeyOrCertificate::Certificate(_) => false,
        })
    }
}

fn ssh_error(what: &str, e: impl std::fmt::Display) -> MicrosandboxError {
    MicrosandboxError::Agent(format!("ssh: {what}: {e}"))
}

/// An SSH connection to a sandbox.
pub struct SshClient {
    handle: client::Handle<Expect>,
}

impl std::fmt::Debug for SshClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshClient").finish_non_exhaustive()
    }
}

fn client_config() -> Arc<client::Config> {
    Arc::new(client::Config {
        inactivity_timeout: None,
        ..client::Config::default()
    })
}

impl SshClient {
    /// A server for `state` and a client joined by an in-memory pipe.
    pub(crate) async fn over_duplex(
        server: Arc<russh::server::Config>,
        state: Arc<ServerState>,
        host_key: PublicKey,
        key: PrivateKey,
        user: &str,
    ) -> MicrosandboxResult<SshClient> {
        let (server_io, client_io) = tokio::io::duplex(256 << 10);
        // The server side starts with the exchange of versions, so it runs beside the
        // client; it ends when the pipe closes (the client holds the other end).
        tokio::spawn(async move {
            if let Ok(running) =
                russh::server::run_stream(server, server_io, Connection::new(state)).await
            {
                let _ = running.await;
            }
        });
        let handle = client::connect_stream(client_config(), client_io, Expect(host_key))
            .await
            .map_err(|e| ssh_error("connect", e))?;
        SshClient::login(handle, key, user).await
    }

    /// A client of the endpoint at `addr`.
    pub(crate) async fn over_tcp(
        addr: SocketAddr,
        host_key: PublicKey,
        key: PrivateKey,
        user: &str,
    ) -> MicrosandboxResult<SshClient> {
        let handle = client::connect(client_config(), addr, Expect(host_key))
            .await
            .map_err(|e| ssh_error("connect", e))?;
        SshClient::login(handle, key, user).await
    }

    async fn login(
        mut handle: client::Handle<Expect>,
        key: PrivateKey,
        user: &str,
    ) -> MicrosandboxResult<SshClient> {
        let auth = handle
            .authenticate_publickey(user, PrivateKeyWithHashAlg::new(Arc::new(key), None))
            .await
            .map_err(|e| ssh_error("authenticate", e))?;
        if !auth.success() {
            return Err(ssh_error("authenticate", "the key was refused"));
        }
        Ok(SshClient { handle })
    }

    /// A new session channel, for what [`SshClient::exec`] does not cover: a PTY
    /// (`request_pty`, then `request_shell`), streaming input, signals.
    pub async fn channel(&self) -> MicrosandboxResult<Channel<Msg>> {
        self.handle
            .channel_open_session()
            .await
            .map_err(|e| ssh_error("open a session", e))
    }

    /// Runs `command` with the sandbox's shell (no input) and collects what it printed
    /// and how it ended.
    pub async fn exec(&self, command: &str) -> MicrosandboxResult<SshOutput> {
        let mut ch = self.channel().await?;
        ch.exec(true, command)
            .await
            .map_err(|e| ssh_error("exec", e))?;
        ch.eof().await.map_err(|e| ssh_error("exec", e))?;
        let mut out = SshOutput {
            stdout: Vec::new(),
            stderr: Vec::new(),
            exit_status: None,
            exit_signal: None,
        };
        while let Some(msg) = ch.wait().await {
            match msg {
                ChannelMsg::Data { data } => out.stdout.extend_from_slice(&data),
                ChannelMsg::ExtendedData { data, ext: 1 } => out.stderr.extend_from_slice(&data),
                ChannelMsg::ExitStatus { exit_status } => out.exit_status = Some(exit_status),
                ChannelMsg::ExitSignal { signal_name, .. } => {
                    out.exit_signal = Some(format!("{signal_name:?}"))
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// An SFTP session (file transfer, listing, renames) over this connection.
    pub async fn sftp(&self) -> MicrosandboxResult<russh_sftp::client::SftpSession> {
        let ch = self.channel().await?;
        ch.request_subsystem(true, "sftp")
            .await
            .map_err(|e| ssh_error("sftp", e))?;
        russh_sftp::client::SftpSession::new(ch.into_stream())
            .await
            .map_err(|e| ssh_error("sftp", e))
    }

    /// Closes the connection.
    pub async fn close(self) -> MicrosandboxResult<()> {
        self.handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await
            .map_err(|e| ssh_error("disconnect", e))
    }
}
