//! The `sftp` subsystem of the SSH endpoint (what OpenSSH's `scp` and `sftp` speak), served
//! with the SDK's file API: nothing needs to run in the guest for it.
//!
//! A file opened for reading is spooled from the guest into an unnamed host temporary file
//! and read from there; one opened for writing is written to such a file and committed to
//! the guest in one write when it is closed (so a guest file is never half-written by a
//! broken transfer). Paths that are not absolute are relative to `/root`. File requests
//! run as root in the guest, whatever user logged in.

use std::collections::{HashMap, VecDeque};
use std::io::{Seek, Write};
use std::os::unix::fs::FileExt;
use std::time::UNIX_EPOCH;

use russh_sftp::protocol::{
    Attrs, Data, File, FileAttributes, Handle, Name, OpenFlags, Status, StatusCode, Version,
};
use russh_sftp::server::StatusReply;

use crate::error::{FsErrorKind, MicrosandboxError};
use crate::fs::{FsEntryKind, FsMetadata};
use crate::sandbox::Sandbox;

/// Where relative paths start.
const HOME: &str = "/root";
/// Open files and directories one session may hold.
const MAX_HANDLES: usize = 64;
/// Directory entries per `readdir` answer (a packet stays far below OpenSSH's 256 KiB).
const DIR_BATCH: usize = 100;
/// The largest read answered at once (OpenSSH asks for 32 KiB).
const MAX_READ: u32 = 256 << 10;
/// What one session's open files may hold on the host at once (spooled reads and writes,
/// counting a file's whole length): the guest decides how large its files are, and a
/// client how far it writes.
const SPOOL_BUDGET: u64 = 4 << 30;
/// Directory entries one session may hold in open directory handles.
const MAX_DIR_ENTRIES: usize = 200_000;

enum Open {
    File {
        path: String,
        spool: std::fs::File,
        write: bool,
        mode: Option<u32>,
    },
    Dir {
        entries: VecDeque<File>,
    },
}

/// One SFTP session over a sandbox.
pub(crate) struct SftpSession {
    sb: Sandbox,
    handles: HashMap<String, Open>,
    next: u64,
    initialized: bool,
    /// Where spool files go (the sandbox's directory).
    spool_dir: std::path::PathBuf,
}

impl SftpSession {
    pub(crate) fn new(sb: Sandbox) -> Self {
        SftpSession {
            handles: HashMap::new(),
            next: 0,
            initialized: false,
            spool_dir: sb_dir(&sb),
            sb,
        }
    }

    /// Host bytes the open files hold (their lengths).
    fn spooled(&self) -> u64 {
        self.handles
            .values()
            .map(|h| match h {
                Open::File { spool, .. } => spool.metadata().map_or(0, |m| m.len()),
                Open::Dir { .. } => 0,
            })
            .sum()
    }

    /// Refuses growing the spool past the budget by `more` bytes (beyond `now`, what the
    /// file being grown holds).
    fn check_budget(&self, now: u64, wanted: u64) -> Result<(), StatusReply> {
        let others = self.spooled().saturating_sub(now);
        if others.saturating_add(wanted) > SPOOL_BUDGET {
            return Err(StatusCode::Failure.with_message(format!(
                "more than {} GiB in this session's open files",
                SPOOL_BUDGET >> 30
            )));
        }
        Ok(())
    }

    fn dir_entries(&self) -> usize {
        self.handles
            .values()
            .map(|h| match h {
                Open::Dir { entries } => entries.len(),
                Open::File { .. } => 0,
            })
            .sum()
    }

    fn add(&mut self, open: Open) -> Result<String, StatusReply> {
        if self.handles.len() >= MAX_HANDLES {
            return Err(StatusCode::Failure
                .with_message(format!("more than {MAX_HANDLES} open files in one session")));
        }
        self.next += 1;
        let h = self.next.to_string();
        self.handles.insert(h.clone(), open);
        Ok(h)
    }
}

fn sb_dir(sb: &Sandbox) -> std::path::PathBuf {
    sb.paths().dir.clone()
}

fn ok(id: u32) -> Status {
    Status {
        id,
        status_code: StatusCode::Ok,
        error_message: "Ok".into(),
        language_tag: "en-US".into(),
    }
}

/// The SFTP status of an SDK error.
pub(crate) fn status_of(e: &MicrosandboxError) -> StatusReply {
    let code = match e {
        MicrosandboxError::Fs { kind, .. } => match kind {
            FsErrorKind::NotFound => StatusCode::NoSuchFile,
            FsErrorKind::PermissionDenied | FsErrorKind::ReadOnly => StatusCode::PermissionDenied,
            _ => StatusCode::Failure,
        },
        _ => StatusCode::Failure,
    };
    code.with_message(e.to_string())
}

fn io_status(e: &std::io::Error) -> StatusReply {
    StatusCode::Failure.with_message(format!("host spool file: {e}"))
}

/// `path` made absolute (relative to `/root`) and normalised lexically (`.`, `..`,
/// repeated slashes); `..` above the root stays at the root.
pub(crate) fn resolve(path: &str) -> String {
    let joined = if path.starts_with('/') {
        path.to_string()
    } else if path.is_empty() || path == "." {
        HOME.to_string()
    } else {
        format!("{HOME}/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for p in joined.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// SFTP attributes of guest metadata: the file type bits are part of `permissions`
/// (OpenSSH's scp refuses to fetch a file that does not say it is regular).
pub(crate) fn attrs_of(m: &FsMetadata) -> FileAttributes {
    let kind = match m.kind {
        FsEntryKind::File => 0o100000,
        FsEntryKind::Directory => 0o040000,
        FsEntryKind::Symlink => 0o120000,
        FsEntryKind::Other => 0,
    };
    let mtime = m
        .modified
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .and_then(|d| u32::try_from(d.as_secs()).ok());
    FileAttributes {
        size: Some(m.size),
        uid: Some(m.uid),
        user: None,
        gid: Some(m.gid),
        group: None,
        permissions: Some(kind | (m.mode & 0o7777)),
        atime: mtime,
        mtime,
    }
}

fn attrs_reply(
    id: u32,
    m: crate::error::MicrosandboxResult<FsMetadata>,
) -> Result<Attrs, StatusReply> {
    let m = m.map_err(|e| status_of(&e))?;
    Ok(Attrs {
        id,
        attrs: attrs_of(&m),
    })
}

/// An `ls -l` style line for `sftp`'s `ls -l`.
fn long_name(name: &str, m: &FsMetadata) -> String {
    let t = match m.kind {
        FsEntryKind::Directory => 'd',
        FsEntryKind::Symlink => 'l',
        FsEntryKind::File => '-',
        FsEntryKind::Other => '?',
    };
    let mut rwx = String::with_capacity(9);
    for shift in [6, 3, 0] {
        let bits = (m.mode >> shift) & 7;
        rwx.push(if bits & 4 != 0 { 'r' } else { '-' });
        rwx.push(if bits & 2 != 0 { 'w' } else { '-' });
        rwx.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    format!("{t}{rwx} 1 {} {} {} {name}", m.uid, m.gid, m.size)
}

impl russh_sftp::server::Handler for SftpSession {
    type Error = StatusReply;

    fn unimplemented(&self) -> Self::Error {
        StatusCode::OpUnsupported.into()
    }

    async fn init(
        &mut self,
        _version: u32,
        _extensions: HashMap<String, String>,
    ) -> Result<Version, Self::Error> {
        if std::mem::replace(&mut self.initialized, true) {
            return Err(StatusCode::BadMessage.with_message("a second init"));
        }
        Ok(Version::new())
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        Ok(Name {
            id,
            files: vec![File::dummy(resolve(&path))],
        })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        attrs_reply(id, self.sb.fs().stat(&resolve(&path)).await)
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        attrs_reply(id, self.sb.fs().symlink_metadata(&resolve(&path)).await)
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, Self::Error> {
        let (path, written) = match self.handles.get(&handle) {
            Some(Open::File {
                path, spool, write, ..
            }) => (
                path.clone(),
                write
                    .then(|| spool.metadata().map(|m| m.len()))
                    .transpose()
                    .map_err(|e| io_status(&e))?,
            ),
            Some(Open::Dir { .. }) => return Err(StatusCode::Failure.with_message("a directory")),
            None => return Err(StatusCode::Failure.with_message("no such handle")),
        };
        let m = self.sb.fs().stat(&path).await;
        let mut attrs = match m {
            Ok(m) => attrs_of(&m),
            // A file being written is not in the guest until it is closed.
            Err(_) if written.is_some() => FileAttributes {
                permissions: Some(0o100644),
                ..FileAttributes::empty()
            },
            Err(e) => return Err(status_of(&e)),
        };
        if let Some(len) = written {
            attrs.size = Some(len);
        }
        Ok(Attrs { id, attrs })
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        attrs: FileAttributes,
    ) -> Result<Handle, Self::Error> {
        let path = resolve(&filename);
        let write = pflags.intersects(OpenFlags::WRITE | OpenFlags::APPEND);
        let mut spool = tempfile::tempfile_in(&self.spool_dir).map_err(|e| io_status(&e))?;
        let existing = self.sb.fs().stat(&path).await;
        match &existing {
            Ok(m) if m.is_dir() => {
                return Err(StatusCode::Failure.with_message(format!("{path} is a directory")))
            }
            Ok(_) if write && pflags.contains(OpenFlags::CREATE | OpenFlags::EXCLUDE) => {
                return Err(StatusCode::Failure.with_message(format!("{path} exists")))
            }
            Ok(_) => {}
            Err(MicrosandboxError::Fs {
                kind: FsErrorKind::NotFound,
                ..
            }) if write && pflags.contains(OpenFlags::CREATE) => {
                // The directory it goes in must exist (told now, not at the close).
                let parent = match path.rfind('/') {
                    Some(0) | None => "/".to_string(),
                    Some(i) => path[..i].to_string(),
                };
                let dir = self.sb.fs().stat(&parent).await;
                match dir {
                    Ok(d) if d.is_dir() => {}
                    Ok(_) => {
                        return Err(StatusCode::NoSuchFile
                            .with_message(format!("{parent} is not a directory")))
                    }
                    Err(e) => return Err(status_of(&e)),
                }
            }
            Err(e) => return Err(status_of(e)),
        }
        // What is there already, unless it is replaced whole.
        let keep = existing.is_ok() && !(write && pflags.contains(OpenFlags::TRUNCATE));
        if keep {
            let mut stream = self
                .sb
                .fs()
                .read_stream(&path)
                .await
                .map_err(|e| status_of(&e))?;
            // The guest says how large the file is, and may not stop there.
            let mut held = 0u64;
            self.check_budget(0, stream.metadata().size)?;
            while let Some(chunk) = stream.recv().await {
                let chunk = chunk.map_err(|e| status_of(&e))?;
                held += chunk.len() as u64;
                self.check_budget(0, held)?;
                spool.write_all(&chunk).map_err(|e| io_status(&e))?;
            }
        }
        let mode = attrs.permissions.map(|p| p & 0o7777);
        let handle = self.add(Open::File {
            path,
            spool,
            write,
            mode,
        })?;
        Ok(Handle { id, handle })
    }

    async fn read(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        len: u32,
    ) -> Result<Data, Self::Error> {
        let Some(Open::File { spool, .. }) = self.handles.get(&handle) else {
            return Err(StatusCode::Failure.with_message("no such file handle"));
        };
        let mut buf = vec![0u8; len.min(MAX_READ) as usize];
        let n = spool.read_at(&mut buf, offset).map_err(|e| io_status(&e))?;
        if n == 0 && !buf.is_empty() {
            return Err(StatusCode::Eof.into());
        }
        buf.truncate(n);
        Ok(Data { id, data: buf })
    }

    async fn write(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<Status, Self::Error> {
        match self.handles.get(&handle) {
            Some(Open::File {
                spool, write: true, ..
            }) => {
                let now = spool.metadata().map_err(|e| io_status(&e))?.len();
                let end = offset.saturating_add(data.len() as u64);
                self.check_budget(now, end.max(now))?;
                spool
                    .write_all_at(&data, offset)
                    .map_err(|e| io_status(&e))?;
                Ok(ok(id))
            }
            Some(Open::File { .. }) => {
                Err(StatusCode::PermissionDenied.with_message("the file is open for reading"))
            }
            _ => Err(StatusCode::Failure.with_message("no such file handle")),
        }
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, Self::Error> {
        match self.handles.remove(&handle) {
            Some(Open::File {
                path,
                mut spool,
                write: true,
                mode,
            }) => {
                spool
                    .seek(std::io::SeekFrom::Start(0))
                    .map_err(|e| io_status(&e))?;
                let mut src = tokio::fs::File::from_std(spool);
                self.sb
                    .fs()
                    .write_from(&path, mode, &mut src)
                    .await
                    .map_err(|e| status_of(&e))?;
                Ok(ok(id))
            }
            Some(_) => Ok(ok(id)),
            None => Err(StatusCode::Failure.with_message("no such handle")),
        }
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, Self::Error> {
        let path = resolve(&path);
        let list = self.sb.fs().list(&path).await;
        let list = list.map_err(|e| status_of(&e))?;
        if self.dir_entries() + list.len() > MAX_DIR_ENTRIES {
            return Err(StatusCode::Failure.with_message(format!(
                "more than {MAX_DIR_ENTRIES} entries in this session's open directories"
            )));
        }
        let entries = list
            .into_iter()
            .map(|e| File {
                longname: long_name(&e.name, &e.metadata),
                attrs: attrs_of(&e.metadata),
                filename: e.name,
            })
            .collect();
        let handle = self.add(Open::Dir { entries })?;
        Ok(Handle { id, handle })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, Self::Error> {
        let Some(Open::Dir { entries }) = self.handles.get_mut(&handle) else {
            return Err(StatusCode::Failure.with_message("no such directory handle"));
        };
        if entries.is_empty() {
            return Err(StatusCode::Eof.into());
        }
        let n = entries.len().min(DIR_BATCH);
        Ok(Name {
            id,
            files: entries.drain(..n).collect(),
        })
    }

    async fn mkdir(
        &mut self,
        id: u32,
        path: String,
        _attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let r = self.sb.fs().mkdir(&resolve(&path)).await;
        r.map_err(|e| status_of(&e))?;
        Ok(ok(id))
    }

    async fn rmdir(&mut self, id: u32, path: String) -> Result<Status, Self::Error> {
        let path = resolve(&path);
        // rmdir removes empty directories only.
        let list = self.sb.fs().list(&path).await;
        if !list.map_err(|e| status_of(&e))?.is_empty() {
            return Err(StatusCode::Failure.with_message(format!("{path} is not empty")));
        }
        let r = self.sb.fs().remove_dir(&path).await;
        r.map_err(|e| status_of(&e))?;
        Ok(ok(id))
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, Self::Error> {
        let r = self.sb.fs().remove(&resolve(&filename)).await;
        r.map_err(|e| status_of(&e))?;
        Ok(ok(id))
    }

    async fn rename(
        &mut self,
        id: u32,
        oldpath: String,
        newpath: String,
    ) -> Result<Status, Self::Error> {
        let r = self
            .sb
            .fs()
            .rename(&resolve(&oldpath), &resolve(&newpath))
            .await;
        r.map_err(|e| status_of(&e))?;
        Ok(ok(id))
    }

    async fn readlink(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let m = self.sb.fs().symlink_metadata(&resolve(&path)).await;
        match m.map_err(|e| status_of(&e))?.symlink_target {
            Some(t) => Ok(Name {
                id,
                files: vec![File::dummy(t)],
            }),
            None => Err(StatusCode::Failure.with_message("not a symbolic link")),
        }
    }

    async fn setstat(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        self.chmod(&resolve(&path), &attrs).await?;
        Ok(ok(id))
    }

    async fn fsetstat(
        &mut self,
        id: u32,
        handle: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        if let (Some(len), Some(Open::File { spool, .. })) = (attrs.size, self.handles.get(&handle))
        {
            let now = spool.metadata().map_err(|e| io_status(&e))?.len();
            self.check_budget(now, len)?;
        }
        let path = match self.handles.get_mut(&handle) {
            // A file being written: its size now (OpenSSH's scp ends every upload with a
            // size-only fsetstat), its mode when it is committed.
            Some(Open::File {
                write: true,
                spool,
                mode,
                ..
            }) => {
                check_settable(&FileAttributes {
                    size: None,
                    ..attrs.clone()
                })?;
                if let Some(len) = attrs.size {
                    spool.set_len(len).map_err(|e| io_status(&e))?;
                }
                if let Some(p) = attrs.permissions {
                    *mode = Some(p & 0o7777);
                }
                return Ok(ok(id));
            }
            Some(Open::File { path, .. }) => path.clone(),
            _ => return Err(StatusCode::Failure.with_message("no such file handle")),
        };
        self.chmod(&path, &attrs).await?;
        Ok(ok(id))
    }
}

/// Only the mode can be changed (the file API has no owner or time changes, and a size
/// only on a file being written); asking for more is refused, not ignored.
fn check_settable(attrs: &FileAttributes) -> Result<(), StatusReply> {
    if attrs.uid.is_some() || attrs.gid.is_some() || attrs.atime.is_some() || attrs.mtime.is_some()
    {
        return Err(StatusCode::OpUnsupported
            .with_message("only the mode can be set (not owners or times)"));
    }
    if attrs.size.is_some() {
        return Err(StatusCode::OpUnsupported.with_message("truncating through setstat"));
    }
    Ok(())
}

impl SftpSession {
    /// Sets the mode of `path` with the guest's `chmod` (the file API has no mode change).
    async fn chmod(&self, path: &str, attrs: &FileAttributes) -> Result<(), StatusReply> {
        check_settable(attrs)?;
        let Some(p) = attrs.permissions else {
            return Ok(());
        };
        let out = self
            .sb
            .exec_with("chmod", |o| {
                o.args([format!("{:o}", p & 0o7777), path.to_string()])
                    .user("root")
            })
            .await
            .map_err(|e| status_of(&e))?;
        if out.status().success() {
            Ok(())
        } else {
            Err(StatusCode::Failure.with_message(format!(
                "chmod: {}",
                String::from_utf8_lossy(out.stderr_bytes()).trim()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_against_root_lexically() {
        assert_eq!(resolve(""), "/root");
        assert_eq!(resolve("."), "/root");
        assert_eq!(resolve("a/b"), "/root/a/b");
        assert_eq!(resolve("/tmp//x/./y/../z"), "/tmp/x/z");
        assert_eq!(resolve("/../../etc"), "/etc");
        assert_eq!(resolve("../.."), "/");
    }

    #[test]
    fn attributes_carry_the_file_type() {
        let m = FsMetadata {
            kind: FsEntryKind::File,
            size: 5,
            mode: 0o4755,
            uid: 0,
            gid: 0,
            modified: Some(UNIX_EPOCH + std::time::Duration::from_secs(1000)),
            symlink_target: None,
        };
        let a = attrs_of(&m);
        assert!(a.is_regular());
        assert_eq!(a.permissions, Some(0o104755));
        assert_eq!((a.size, a.mtime), (Some(5), Some(1000)));
        let d = attrs_of(&FsMetadata {
            kind: FsEntryKind::Directory,
            mode: 0o755,
            ..m.clone()
        });
        assert!(d.is_dir() && !d.is_regular());
        assert_eq!(
            long_name(
                "bin",
                &FsMetadata {
                    mode: 0o750,
                    ..d_meta()
                }
            ),
            "drwxr-x--- 1 0 0 0 bin"
        );
    }

    fn d_meta() -> FsMetadata {
        FsMetadata {
            kind: FsEntryKind::Directory,
            size: 0,
            mode: 0o755,
            uid: 0,
            gid: 0,
            modified: None,
            symlink_target: None,
        }
    }

    #[test]
    fn only_modes_are_settable() {
        assert!(check_settable(&FileAttributes {
            permissions: Some(0o600),
            ..FileAttributes::empty()
        })
        .is_ok());
        assert!(check_settable(&FileAttributes {
            mtime: Some(1),
            ..FileAttributes::empty()
        })
        .is_err());
    }
}
