//! The sandbox filesystem API ([`Sandbox::fs`](crate::Sandbox::fs)): files in and out of a
//! running sandbox, through the guest agent, so every call sees exactly what commands see
//! (the root overlay, volumes, tmpfs).
//!
//! Each call is one connection to the sandbox. File data moves in chunks of at most
//! 256 KiB in both directions, so reading or writing a file of any size holds a bounded
//! amount of memory (except [`SandboxFs::read`], which returns the whole file: at most
//! [`SandboxFs::read_limit`] bytes, 1 GiB by default, whatever size the guest names). A write
//! lands in a temporary file in the guest that replaces the target only once complete;
//! [`SandboxFs::copy_to_host`] does the same on the host.

use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use msb_protocol::frame::Frame;
use msb_protocol::message::{ErrorKind, FsKind, FsRequest, FsStat, Message, FS_CHUNK};
use tokio::io::AsyncReadExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;

use crate::conn;
use crate::error::{FsErrorKind, MicrosandboxError, MicrosandboxResult};
use crate::home::DEFAULT_FS_READ_LIMIT;
use crate::Sandbox;

/// The session id of the one request on an fs connection.
const SESSION: u32 = 1;
/// Most entries [`SandboxFs::list`] collects: what the guest sends is bounded, whatever it
/// sends.
const MAX_LIST_ENTRIES: usize = 1_000_000;

/// What a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsEntryKind {
    /// Regular file.
    File,
    /// Directory.
    Directory,
    /// Symbolic link.
    Symlink,
    /// Device, FIFO or socket.
    Other,
}

/// Metadata of a path in the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsMetadata {
    /// What it is.
    pub kind: FsEntryKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (`0o7777` mask: setuid, setgid, sticky, rwx).
    pub mode: u32,
    /// Owner's uid in the guest.
    pub uid: u32,
    /// Group's gid in the guest.
    pub gid: u32,
    /// Last modification.
    pub modified: Option<SystemTime>,
    /// Where a symlink points.
    pub symlink_target: Option<String>,
}

impl FsMetadata {
    /// True for a directory.
    pub fn is_dir(&self) -> bool {
        self.kind == FsEntryKind::Directory
    }

    /// True for a regular file.
    pub fn is_file(&self) -> bool {
        self.kind == FsEntryKind::File
    }

    fn from_wire(s: FsStat) -> Self {
        FsMetadata {
            kind: match s.kind {
                FsKind::File => FsEntryKind::File,
                FsKind::Directory => FsEntryKind::Directory,
                FsKind::Symlink => FsEntryKind::Symlink,
                FsKind::Other => FsEntryKind::Other,
            },
            size: s.size,
            mode: s.mode,
            uid: s.uid,
            gid: s.gid,
            modified: u64::try_from(s.mtime_ms)
                .ok()
                .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms)),
            symlink_target: s.target,
        }
    }
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsEntry {
    /// Full guest path.
    pub path: String,
    /// Name in the directory.
    pub name: String,
    /// What it is.
    pub kind: FsEntryKind,
    /// Size in bytes.
    pub size: u64,
    /// Its metadata (symlinks not followed).
    pub metadata: FsMetadata,
}

/// Filesystem access to a running sandbox, from [`Sandbox::fs`](crate::Sandbox::fs).
#[derive(Debug, Clone, Copy)]
pub struct SandboxFs<'a> {
    sb: &'a Sandbox,
    read_limit: u64,
}

impl Sandbox {
    /// Filesystem access inside the running sandbox.
    ///
    /// ```no_run
    /// # async fn demo(sb: &microsandbox::Sandbox) -> microsandbox::MicrosandboxResult<()> {
    /// sb.fs().write("/tmp/hello.txt", "hi").await?;
    /// assert_eq!(sb.fs().read_to_string("/tmp/hello.txt").await?, "hi");
    /// # Ok(()) }
    /// ```
    pub fn fs(&self) -> SandboxFs<'_> {
        SandboxFs::new(self)
    }
}

/// A file's contents as a stream of chunks (from [`SandboxFs::read_stream`]).
pub struct FsReadStream {
    rx: mpsc::Receiver<MicrosandboxResult<Bytes>>,
    metadata: FsMetadata,
}

impl std::fmt::Debug for FsReadStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsReadStream").finish_non_exhaustive()
    }
}

impl FsReadStream {
    /// The next chunk; `None` after the last.
    pub async fn recv(&mut self) -> Option<MicrosandboxResult<Bytes>> {
        self.rx.recv().await
    }

    /// The file's metadata when it was opened; the stream yields at most `size` bytes.
    pub fn metadata(&self) -> &FsMetadata {
        &self.metadata
    }
}

impl futures_core::Stream for FsReadStream {
    type Item = MicrosandboxResult<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

/// The next chunk of at most [`FS_CHUNK`] bytes; `None` at the end.
async fn read_chunk(
    src: &mut (impl tokio::io::AsyncRead + Unpin),
) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; FS_CHUNK];
    let mut filled = 0;
    while filled < buf.len() {
        let n = src.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    buf.truncate(filled);
    Ok((filled > 0).then_some(buf))
}

/// Collects a file's stream for [`SandboxFs::read`], refusing more than `limit` bytes:
/// first the size the guest announced (so nothing is read of a file that will not fit),
/// then what actually arrives (the guest is untrusted).
async fn collect_file(mut s: FsReadStream, path: &str, limit: u64) -> MicrosandboxResult<Bytes> {
    let too_large = || MicrosandboxError::TooLarge {
        what: format!("the file {path}"),
        limit,
    };
    if s.metadata.size > limit {
        return Err(too_large());
    }
    // The announced size bounds what arrives; reserve up to a sane amount of it.
    let mut out = BytesMut::with_capacity(s.metadata.size.min(64 << 20) as usize);
    while let Some(chunk) = s.recv().await {
        let chunk = chunk?;
        if (out.len() as u64).saturating_add(chunk.len() as u64) > limit {
            return Err(too_large());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

/// Turns the agent's answer into a typed error.
fn agent_error(op: &'static str, path: &str, m: Message) -> MicrosandboxError {
    match m {
        Message::Error {
            kind: ErrorKind::Paused,
            message,
        } => MicrosandboxError::Paused(message),
        Message::Error { kind, message } => MicrosandboxError::Fs {
            op,
            path: path.to_string(),
            kind: FsErrorKind::from_agent(kind),
            message,
        },
        other => MicrosandboxError::Agent(format!("unexpected answer to {op}: {other:?}")),
    }
}

/// The rest of a read once the request went out on `(r, w)`: the guest's first answer
/// (the file's metadata, or why it did not open), then its chunks on a task.
async fn read_stream_on(
    mut r: OwnedReadHalf,
    w: OwnedWriteHalf,
    path: &str,
) -> MicrosandboxResult<FsReadStream> {
    // The first answer says whether the file opened, and how big it is.
    let metadata = match conn::read_frame(&mut r).await? {
        Some(Frame {
            message: Message::FsStat(s),
            ..
        }) => FsMetadata::from_wire(s),
        Some(f) => return Err(agent_error("read", path, f.message)),
        None => return Err(MicrosandboxError::ConnectionClosed),
    };
    let (tx, rx) = mpsc::channel(4);
    let path = path.to_string();
    // A size of 0 is a procfs-like file: the guest sends what reading it gives.
    let mut left = match metadata.size {
        0 => msb_protocol::message::FS_SIZELESS_MAX,
        n => n,
    };
    tokio::spawn(async move {
        let _w = w;
        loop {
            let item = match conn::read_frame(&mut r).await {
                Ok(Some(Frame {
                    message: Message::FsData(d),
                    ..
                })) if d.len() as u64 <= left => {
                    left -= d.len() as u64;
                    Ok(Bytes::from(d))
                }
                Ok(Some(Frame {
                    message: Message::FsData(_),
                    ..
                })) => Err(MicrosandboxError::Agent(format!(
                    "the guest sent more of {path} than its size"
                ))),
                Ok(Some(Frame {
                    message: Message::FsDone,
                    ..
                })) => return,
                Ok(Some(f)) => Err(agent_error("read", &path, f.message)),
                Ok(None) => Err(MicrosandboxError::ConnectionClosed),
                Err(e) => Err(e),
            };
            let stop = item.is_err();
            if tx.send(item).await.is_err() || stop {
                return;
            }
        }
    });
    Ok(FsReadStream { rx, metadata })
}

impl<'a> SandboxFs<'a> {
    pub(crate) fn new(sb: &'a Sandbox) -> Self {
        SandboxFs {
            sb,
            read_limit: DEFAULT_FS_READ_LIMIT,
        }
    }

    /// The most bytes [`SandboxFs::read`] and [`SandboxFs::read_to_string`] return
    /// (default [`DEFAULT_FS_READ_LIMIT`], 1 GiB); a larger file is
    /// [`MicrosandboxError::TooLarge`]. The guest announces sizes, so whole-file reads are
    /// bounded; [`SandboxFs::read_stream`] and [`SandboxFs::copy_to_host`] have no limit.
    ///
    /// ```no_run
    /// # async fn demo(sb: &microsandbox::Sandbox) -> microsandbox::MicrosandboxResult<()> {
    /// let config = sb.fs().read_limit(64 << 10).read("/etc/app.conf").await?;
    /// # Ok(()) }
    /// ```
    pub fn read_limit(mut self, bytes: u64) -> Self {
        self.read_limit = bytes;
        self
    }

    async fn open(&self, req: FsRequest) -> MicrosandboxResult<(OwnedReadHalf, OwnedWriteHalf)> {
        let request = Frame::new(SESSION, Message::Fs(req));
        let (r, w) = match conn::open_with(self.sb.control_path(), Some(&request)).await {
            Ok(c) => c,
            Err(MicrosandboxError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Err(MicrosandboxError::NotRunning(self.sb.name().to_string()))
            }
            Err(e) => return Err(e),
        };
        Ok((r, w))
    }

    /// Sends a request that has one answer and returns it (an `Error` becomes an error).
    async fn call(
        &self,
        op: &'static str,
        path: &str,
        req: FsRequest,
    ) -> MicrosandboxResult<Message> {
        let (mut r, _w) = self.open(req).await?;
        match conn::read_frame(&mut r).await? {
            Some(Frame {
                message: m @ Message::Error { .. },
                ..
            }) => Err(agent_error(op, path, m)),
            Some(f) => Ok(f.message),
            None => Err(MicrosandboxError::ConnectionClosed),
        }
    }

    async fn done(&self, op: &'static str, path: &str, req: FsRequest) -> MicrosandboxResult<()> {
        match self.call(op, path, req).await? {
            Message::FsDone => Ok(()),
            other => Err(agent_error(op, path, other)),
        }
    }

    /// Reads a whole file: at most [`SandboxFs::read_limit`] bytes (1 GiB by default), else
    /// [`MicrosandboxError::TooLarge`] before any of it is read.
    ///
    /// ```no_run
    /// # async fn demo(sb: &microsandbox::Sandbox) -> microsandbox::MicrosandboxResult<()> {
    /// let bytes = sb.fs().read("/etc/hostname").await?;
    /// # Ok(()) }
    /// ```
    pub async fn read(&self, path: &str) -> MicrosandboxResult<Bytes> {
        let s = self.read_stream(path).await?;
        collect_file(s, path, self.read_limit).await
    }

    /// Reads a whole file as UTF-8 text.
    pub async fn read_to_string(&self, path: &str) -> MicrosandboxResult<String> {
        let bytes = self.read(path).await?;
        Ok(String::from_utf8(bytes.to_vec())?)
    }

    /// Streams a file in chunks of at most 256 KiB. The guest reads only as fast as the
    /// stream is consumed, and sends at most the size the file had when it was opened
    /// ([`FsReadStream::metadata`]); more is an error.
    pub async fn read_stream(&self, path: &str) -> MicrosandboxResult<FsReadStream> {
        let (r, w) = self
            .open(FsRequest::Read {
                path: path.to_string(),
            })
            .await?;
        read_stream_on(r, w, path).await
    }

    /// Writes `data` to `path`, replacing the file (which keeps its mode and owner) or
    /// creating it with mode 0644. The parent directory must exist.
    pub async fn write(&self, path: &str, data: impl AsRef<[u8]>) -> MicrosandboxResult<()> {
        self.write_from(path, None, data.as_ref()).await
    }

    /// Sends a write of everything `src` yields, in chunks. Stops sending as soon as the
    /// agent answers (an early error).
    pub(crate) async fn write_from(
        &self,
        path: &str,
        mode: Option<u32>,
        mut src: impl tokio::io::AsyncRead + Unpin,
    ) -> MicrosandboxResult<()> {
        let (mut r, mut w) = self
            .open(FsRequest::Write {
                path: path.to_string(),
                mode,
            })
            .await?;
        let reply = tokio::spawn(async move { conn::read_frame(&mut r).await });
        let mut send_failed = None;
        loop {
            if reply.is_finished() {
                break;
            }
            let chunk = match read_chunk(&mut src).await {
                Ok(c) => c,
                Err(e) => {
                    // The agent drops the temporary file when the connection closes.
                    reply.abort();
                    return Err(e.into());
                }
            };
            let last = chunk.is_none();
            let frame = Frame::new(SESSION, Message::FsData(chunk.unwrap_or_default()));
            if let Err(e) = conn::write_frame(&mut w, &frame).await {
                send_failed = Some(e);
                break;
            }
            if last {
                break;
            }
        }
        let answer = reply
            .await
            .map_err(|e| MicrosandboxError::Agent(format!("the reply reader failed: {e}")))?;
        match answer {
            Ok(Some(Frame {
                message: Message::FsDone,
                ..
            })) => Ok(()),
            Ok(Some(f)) => Err(agent_error("write", path, f.message)),
            Ok(None) => Err(send_failed.unwrap_or(MicrosandboxError::ConnectionClosed)),
            Err(e) => Err(e),
        }
    }

    /// The entries of a directory, sorted by name.
    pub async fn list(&self, path: &str) -> MicrosandboxResult<Vec<FsEntry>> {
        let req = FsRequest::List {
            path: path.to_string(),
        };
        let (mut r, _w) = self.open(req).await?;
        let mut out = Vec::new();
        loop {
            let entries = match conn::read_frame(&mut r).await? {
                Some(Frame {
                    message: Message::FsEntries(entries),
                    ..
                }) => entries,
                Some(Frame {
                    message: Message::FsDone,
                    ..
                }) => return Ok(out),
                Some(f) => return Err(agent_error("list", path, f.message)),
                None => return Err(MicrosandboxError::ConnectionClosed),
            };
            if out.len() + entries.len() > MAX_LIST_ENTRIES {
                return Err(MicrosandboxError::Agent(format!(
                    "{path} lists more than {MAX_LIST_ENTRIES} entries"
                )));
            }
            out.extend(entries.into_iter().map(|e| {
                let metadata = FsMetadata::from_wire(e.stat);
                FsEntry {
                    path: format!("{}/{}", path.trim_end_matches('/'), e.name),
                    name: e.name,
                    kind: metadata.kind,
                    size: metadata.size,
                    metadata,
                }
            }));
        }
    }

    async fn stat_with(&self, path: &str, follow: bool) -> MicrosandboxResult<FsMetadata> {
        let req = FsRequest::Stat {
            path: path.to_string(),
            follow,
        };
        match self.call("stat", path, req).await? {
            Message::FsStat(s) => Ok(FsMetadata::from_wire(s)),
            other => Err(agent_error("stat", path, other)),
        }
    }

    /// Metadata of `path` (a final symlink is followed).
    pub async fn stat(&self, path: &str) -> MicrosandboxResult<FsMetadata> {
        self.stat_with(path, true).await
    }

    /// Metadata of `path` itself, a symlink not followed.
    pub async fn symlink_metadata(&self, path: &str) -> MicrosandboxResult<FsMetadata> {
        self.stat_with(path, false).await
    }

    /// True when `path` exists (a final symlink is followed, as `Path::exists` does).
    pub async fn exists(&self, path: &str) -> MicrosandboxResult<bool> {
        match self.stat(path).await {
            Ok(_) => Ok(true),
            Err(MicrosandboxError::Fs {
                kind: FsErrorKind::NotFound,
                ..
            }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates a directory (mode 0755); the parent must exist.
    pub async fn mkdir(&self, path: &str) -> MicrosandboxResult<()> {
        let req = FsRequest::Mkdir {
            path: path.to_string(),
            mode: 0o755,
            parents: false,
        };
        self.done("mkdir", path, req).await
    }

    /// Creates a directory and its missing parents (mode 0755); an existing one is fine.
    pub async fn mkdir_all(&self, path: &str) -> MicrosandboxResult<()> {
        let req = FsRequest::Mkdir {
            path: path.to_string(),
            mode: 0o755,
            parents: true,
        };
        self.done("mkdir", path, req).await
    }

    /// Removes a file or symlink (not a directory).
    pub async fn remove(&self, path: &str) -> MicrosandboxResult<()> {
        let req = FsRequest::Remove {
            path: path.to_string(),
        };
        self.done("remove", path, req).await
    }

    /// Removes a directory and everything in it.
    pub async fn remove_dir(&self, path: &str) -> MicrosandboxResult<()> {
        let req = FsRequest::RemoveDir {
            path: path.to_string(),
            recursive: true,
        };
        self.done("remove_dir", path, req).await
    }

    /// Renames (moves) `from` to `to`, replacing a file at `to`.
    pub async fn rename(&self, from: &str, to: &str) -> MicrosandboxResult<()> {
        let req = FsRequest::Rename {
            from: from.to_string(),
            to: to.to_string(),
        };
        self.done("rename", from, req).await
    }

    /// Copies a file inside the sandbox.
    pub async fn copy(&self, from: &str, to: &str) -> MicrosandboxResult<()> {
        let req = FsRequest::Copy {
            from: from.to_string(),
            to: to.to_string(),
        };
        self.done("copy", from, req).await
    }

    /// Copies the host file `host_path` to `guest_path` in chunks, keeping its permission
    /// bits.
    pub async fn copy_from_host(
        &self,
        host_path: impl AsRef<Path>,
        guest_path: &str,
    ) -> MicrosandboxResult<()> {
        use std::os::unix::fs::PermissionsExt;
        let mut f = tokio::fs::File::open(host_path.as_ref()).await?;
        let meta = f.metadata().await?;
        if !meta.is_file() {
            return Err(MicrosandboxError::InvalidConfig(format!(
                "{} is not a regular file",
                host_path.as_ref().display()
            )));
        }
        let mode = meta.permissions().mode() & 0o7777;
        self.write_from(guest_path, Some(mode), &mut f).await
    }

    /// Copies `guest_path` to the host file `host_path` in chunks, keeping its permission
    /// bits (not setuid, setgid or sticky: the host file belongs to this process). The host
    /// file is replaced only once the copy is complete; a failed or cancelled copy leaves
    /// nothing behind.
    pub async fn copy_to_host(
        &self,
        guest_path: &str,
        host_path: impl AsRef<Path>,
    ) -> MicrosandboxResult<()> {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        let host_path = host_path.as_ref().to_path_buf();
        let dir = match host_path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let name = host_path
            .file_name()
            .ok_or_else(|| {
                MicrosandboxError::InvalidConfig(format!("{} names no file", host_path.display()))
            })?
            .to_string_lossy()
            .into_owned();
        let mut s = self.read_stream(guest_path).await?;
        let mode = s.metadata().mode & 0o777;
        // Removed on drop, so an error or a cancelled future leaves no temporary file.
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".msb-copy")
            .tempfile_in(&dir)?;
        let (file, tmp_path) = tmp.into_parts();
        let mut file = Some(file);
        while let Some(chunk) = s.recv().await {
            let chunk = chunk?;
            let mut f = file.take().ok_or(MicrosandboxError::ConnectionClosed)?;
            f = tokio::task::spawn_blocking(move || f.write_all(&chunk).map(|()| f))
                .await
                .map_err(|e| MicrosandboxError::Io(std::io::Error::other(e)))??;
            file = Some(f);
        }
        let f = file.ok_or(MicrosandboxError::ConnectionClosed)?;
        tokio::task::spawn_blocking(move || {
            f.sync_all()?;
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
            tmp_path.persist(&host_path).map_err(|e| e.error)
        })
        .await
        .map_err(|e| MicrosandboxError::Io(std::io::Error::other(e)))??;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use msb_protocol::message::FS_SIZELESS_MAX;

    fn stat(size: u64) -> Message {
        Message::FsStat(FsStat {
            kind: FsKind::File,
            size,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ms: 0,
            target: None,
        })
    }

    /// `SandboxFs::read` against a fake guest that answers with `answers`.
    async fn read_from(answers: Vec<Message>, limit: u64) -> MicrosandboxResult<Bytes> {
        let (_dir, control) = crate::fake_agent::serve_once(answers);
        let request = Frame::new(SESSION, Message::Fs(FsRequest::Read { path: "/f".into() }));
        let (r, w) = conn::open_with(&control, Some(&request))
            .await
            .expect("connected");
        let s = read_stream_on(r, w, "/f").await?;
        collect_file(s, "/f", limit).await
    }

    fn too_large(r: &MicrosandboxResult<Bytes>, limit: u64) -> bool {
        matches!(r, Err(MicrosandboxError::TooLarge { what, limit: l })
            if what == "the file /f" && *l == limit)
    }

    #[tokio::test]
    async fn whole_file_reads_are_bounded_whatever_the_guest_announces() {
        // Fits: read whole.
        let ok = read_from(
            vec![stat(500), Message::FsData(vec![1; 500]), Message::FsDone],
            1000,
        )
        .await
        .expect("fits");
        assert_eq!(ok.len(), 500);

        // A size past the limit is refused before any data (none is sent here).
        let huge = read_from(vec![stat(1 << 40)], DEFAULT_FS_READ_LIMIT).await;
        assert!(too_large(&huge, DEFAULT_FS_READ_LIMIT), "{huge:?}");

        // A sizeless (procfs-like) file is bounded by what arrives.
        let chunks = vec![
            stat(0),
            Message::FsData(vec![2; 400]),
            Message::FsData(vec![2; 400]),
            Message::FsData(vec![2; 400]),
            Message::FsDone,
        ];
        let sizeless = read_from(chunks, 1000).await;
        assert!(too_large(&sizeless, 1000), "{sizeless:?}");
        const { assert!(FS_SIZELESS_MAX < DEFAULT_FS_READ_LIMIT) };

        // Sending past the announced size is still a protocol violation.
        let liar = read_from(vec![stat(10), Message::FsData(vec![3; 20])], 1000).await;
        assert!(matches!(liar, Err(MicrosandboxError::Agent(_))), "{liar:?}");
    }
}
