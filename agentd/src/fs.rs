//! Filesystem requests: the SDK's `fs()` API, served in the guest so it sees exactly what
//! commands see (the overlay root, volumes, tmpfs). Each request is a session of its own;
//! file data moves in [`FS_CHUNK`] frames, so a file of any size needs bounded memory on
//! both sides and a slow peer slows the transfer, not the agent.
//!
//! A write goes to a temporary file beside the target that replaces it only once every
//! chunk has arrived: a failed or abandoned write leaves the target as it was.

use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::time::UNIX_EPOCH;

use msb_protocol::frame::Frame;
use msb_protocol::message::{ErrorKind, FsEntry, FsKind, FsRequest, FsStat, Message, FS_CHUNK};

use crate::reply::{error, send, send_fs_data, Writer};

/// Mode of a file a write creates when the request names none.
const DEFAULT_FILE_MODE: u32 = 0o644;

/// The protocol's error kind for an I/O error.
pub(crate) fn kind_of(e: &io::Error) -> ErrorKind {
    match e.raw_os_error() {
        Some(libc::ENOENT) => ErrorKind::NotFound,
        Some(libc::EEXIST) => ErrorKind::AlreadyExists,
        Some(libc::ENOTDIR) => ErrorKind::NotADirectory,
        Some(libc::EISDIR) => ErrorKind::IsADirectory,
        Some(libc::ENOTEMPTY) => ErrorKind::NotEmpty,
        Some(libc::EROFS) => ErrorKind::ReadOnly,
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => ErrorKind::NoSpace,
        Some(libc::EACCES | libc::EPERM) => ErrorKind::PermissionDenied,
        Some(libc::EINVAL | libc::ENAMETOOLONG | libc::ELOOP) => ErrorKind::InvalidRequest,
        None if e.kind() == io::ErrorKind::InvalidInput => ErrorKind::InvalidRequest,
        _ => ErrorKind::Internal,
    }
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// An absolute guest path from a request.
fn guest_path(p: &str) -> io::Result<PathBuf> {
    if !p.starts_with('/') || p.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{p:?} is not an absolute path"),
        ));
    }
    Ok(PathBuf::from(p))
}

/// The wire form of `meta` (of `path`, for a symlink's target).
pub(crate) fn stat_of(path: &Path, meta: &Metadata) -> FsStat {
    let ft = meta.file_type();
    let kind = if ft.is_dir() {
        FsKind::Directory
    } else if ft.is_file() {
        FsKind::File
    } else if ft.is_symlink() {
        FsKind::Symlink
    } else {
        FsKind::Other
    };
    let mtime_ms = meta
        .modified()
        .ok()
        .and_then(|t| match t.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).ok(),
            Err(e) => i64::try_from(e.duration().as_millis()).ok().map(|m| -m),
        })
        .unwrap_or(0);
    FsStat {
        kind,
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime_ms,
        target: ft
            .is_symlink()
            .then(|| fs::read_link(path).ok())
            .flatten()
            .map(|t| t.to_string_lossy().into_owned()),
    }
}

/// Answers `req` on session `id`. `data` carries the chunks of a write (an empty chunk ends
/// them; a closed channel means the client went away and the write is abandoned).
pub(crate) fn serve(id: u32, req: FsRequest, writer: &Writer, data: Option<Receiver<Vec<u8>>>) {
    let result = match req {
        FsRequest::Stat { path, follow } => guest_path(&path)
            .and_then(|p| {
                let meta = if follow {
                    fs::metadata(&p)
                } else {
                    fs::symlink_metadata(&p)
                }?;
                Ok(stat_of(&p, &meta))
            })
            .map(|s| Some(Message::FsStat(s))),
        FsRequest::List { path } => guest_path(&path).and_then(|p| list(id, &p, writer)),
        FsRequest::Read { path } => guest_path(&path).and_then(|p| read(id, &p, writer)),
        FsRequest::Write { path, mode } => match data {
            Some(rx) => guest_path(&path).and_then(|p| write(&p, mode, &rx)),
            None => Err(errno(libc::EINVAL)),
        },
        FsRequest::Mkdir {
            path,
            mode,
            parents,
        } => guest_path(&path)
            .and_then(|p| mkdir(&p, mode, parents))
            .map(|()| Some(Message::FsDone)),
        FsRequest::Remove { path } => guest_path(&path)
            .and_then(|p| {
                if fs::symlink_metadata(&p)?.is_dir() {
                    return Err(errno(libc::EISDIR));
                }
                fs::remove_file(&p)
            })
            .map(|()| Some(Message::FsDone)),
        FsRequest::RemoveDir { path, recursive } => guest_path(&path)
            .and_then(|p| {
                if !fs::symlink_metadata(&p)?.is_dir() {
                    return Err(errno(libc::ENOTDIR));
                }
                if recursive {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_dir(&p)
                }
            })
            .map(|()| Some(Message::FsDone)),
        FsRequest::Rename { from, to } => guest_path(&from)
            .and_then(|f| Ok((f, guest_path(&to)?)))
            .and_then(|(f, t)| fs::rename(f, t))
            .map(|()| Some(Message::FsDone)),
        FsRequest::Copy { from, to } => guest_path(&from)
            .and_then(|f| Ok((f, guest_path(&to)?)))
            .and_then(|(f, t)| copy(&f, &t))
            .map(|()| Some(Message::FsDone)),
    };
    match result {
        Ok(Some(reply)) => {
            send(writer, &Frame::new(id, reply).end());
        }
        // The client went away (an abandoned write): nobody to answer.
        Ok(None) => {}
        Err(e) => error(writer, id, kind_of(&e), e.to_string()),
    }
}

/// Bytes of entries (names and link targets, roughly) per `FsEntries` frame: far below the
/// frame limit whatever the names, so a directory of any size lists.
const LIST_BATCH_BYTES: usize = 128 * 1024;

/// Sends a directory's entries, sorted by name, in `FsEntries` frames, then `FsDone`.
fn list(id: u32, dir: &Path, writer: &Writer) -> io::Result<Option<Message>> {
    let mut entries = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let path = e.path();
        // An entry removed while we list is simply not listed.
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        entries.push(FsEntry {
            name: e.file_name().to_string_lossy().into_owned(),
            stat: stat_of(&path, &meta),
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let mut batch = Vec::new();
    let mut bytes = 0;
    for e in entries {
        bytes += 64 + e.name.len() + e.stat.target.as_ref().map_or(0, String::len);
        batch.push(e);
        if bytes >= LIST_BATCH_BYTES {
            if !send(
                writer,
                &Frame::new(id, Message::FsEntries(std::mem::take(&mut batch))),
            ) {
                return Ok(None);
            }
            bytes = 0;
        }
    }
    if !batch.is_empty() && !send(writer, &Frame::new(id, Message::FsEntries(batch))) {
        return Ok(None);
    }
    Ok(Some(Message::FsDone))
}

/// Opens a regular file for reading. Opening without blocking first means a FIFO cannot
/// hang the request, and the check refuses devices (`/dev/zero` never ends).
fn open_regular(path: &Path) -> io::Result<(File, Metadata)> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = f.metadata()?;
    if meta.is_dir() {
        return Err(errno(libc::EISDIR));
    }
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    // Regular files ignore O_NONBLOCK, but leave nothing surprising behind.
    let flags =
        nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) & !nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))
        .map_err(io::Error::from)?;
    Ok((f, meta))
}

/// Streams a regular file: its metadata first (the size the client may expect), then at
/// most that many bytes as chunks, then `FsDone`. What a file grows by while it is read is
/// not sent.
fn read(id: u32, path: &Path, writer: &Writer) -> io::Result<Option<Message>> {
    let (f, meta) = open_regular(path)?;
    if !send(
        writer,
        &Frame::new(id, Message::FsStat(stat_of(path, &meta))),
    ) {
        return Ok(None);
    }
    // A procfs or sysfs file says 0 until read: read it to its end, within a bound.
    let limit = match meta.len() {
        0 => msb_protocol::message::FS_SIZELESS_MAX,
        n => n,
    };
    let mut f = f.take(limit);
    let mut buf = vec![0u8; FS_CHUNK];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => return Ok(Some(Message::FsDone)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if !send_fs_data(writer, id, &buf[..n]) {
            // The client is gone.
            return Ok(None);
        }
    }
}

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Creates a fresh temporary file in `dir` (mode 0600). The name does not grow with the
/// target's (a 255-byte name still gets a temporary file), and one left by a VM that died
/// mid-write is stepped over, not tripped on.
fn temp_in(dir: &Path) -> io::Result<(File, PathBuf)> {
    let nanos = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    loop {
        let seq = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let p = dir.join(format!(".msb-write-{}-{nanos:x}-{seq}", std::process::id()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
        {
            Ok(f) => return Ok((f, p)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && seq < u64::MAX => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Removes the temporary file unless the write completed.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// Writes the chunks from `rx` to a temporary file beside `path`, then renames it over
/// `path`. An existing file keeps its owner, and its mode unless `mode` is given; a final
/// symlink is followed.
fn write(path: &Path, mode: Option<u32>, rx: &Receiver<Vec<u8>>) -> io::Result<Option<Message>> {
    replace_file(path, mode, |f| {
        loop {
            match rx.recv() {
                Ok(chunk) if chunk.is_empty() => return Ok(true),
                Ok(chunk) => f.write_all(&chunk)?,
                // The client went away mid-write: the target stays as it was.
                Err(_) => return Ok(false),
            }
        }
    })
}

/// Fills a temporary file beside `path` with `fill` (which returns false to abandon the
/// write), then renames it over `path`, keeping an existing file's owner and, unless
/// `mode` is given, its mode.
fn replace_file(
    path: &Path,
    mode: Option<u32>,
    fill: impl FnOnce(&mut File) -> io::Result<bool>,
) -> io::Result<Option<Message>> {
    let target = match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => fs::canonicalize(path)?,
        _ => path.to_path_buf(),
    };
    let existing = match fs::metadata(&target) {
        Ok(m) if m.is_dir() => return Err(errno(libc::EISDIR)),
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let (Some(dir), Some(_)) = (target.parent(), target.file_name()) else {
        return Err(errno(libc::EINVAL));
    };
    let (mut f, tmp_path) = temp_in(dir)?;
    let mut tmp = TempFile(Some(tmp_path.clone()));
    if !fill(&mut f)? {
        return Ok(None);
    }
    if let Some(m) = &existing {
        std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()))?;
    }
    let mode = match (mode, &existing) {
        (Some(mode), _) => mode,
        (None, Some(m)) => m.mode(),
        (None, None) => DEFAULT_FILE_MODE,
    };
    // After the chown, which clears setuid and setgid bits.
    f.set_permissions(fs::Permissions::from_mode(mode & 0o7777))?;
    drop(f);
    fs::rename(&tmp_path, &target)?;
    tmp.0 = None;
    Ok(Some(Message::FsDone))
}

fn mkdir(path: &Path, mode: u32, parents: bool) -> io::Result<()> {
    if parents && fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        // An existing directory keeps its mode (`mkdir -p /tmp` must not change /tmp).
        return Ok(());
    }
    let mut b = fs::DirBuilder::new();
    b.mode(mode & 0o7777).recursive(parents);
    b.create(path)?;
    // The umask trimmed the mode; the caller asked for exactly this one.
    fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7777))
}

/// Copies a regular file the way a write does: into a temporary file beside `to`, renamed
/// over it when complete (the copy gets the source's mode).
fn copy(from: &Path, to: &Path) -> io::Result<()> {
    let (mut src, meta) = open_regular(from)?;
    if fs::metadata(to).is_ok_and(|t| t.dev() == meta.dev() && t.ino() == meta.ino()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} and {} are the same file", from.display(), to.display()),
        ));
    }
    replace_file(to, Some(meta.mode()), |f| {
        io::copy(&mut src, f)?;
        Ok(true)
    })
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_kinds() {
        assert_eq!(kind_of(&errno(libc::ENOENT)), ErrorKind::NotFound);
        assert_eq!(kind_of(&errno(libc::EROFS)), ErrorKind::ReadOnly);
        assert_eq!(kind_of(&errno(libc::ENOSPC)), ErrorKind::NoSpace);
        assert_eq!(kind_of(&errno(libc::ENOTEMPTY)), ErrorKind::NotEmpty);
        assert_eq!(kind_of(&errno(libc::EIO)), ErrorKind::Internal);
        let relative = guest_path("relative").expect_err("relative");
        assert_eq!(kind_of(&relative), ErrorKind::InvalidRequest);
        assert!(guest_path("/ok").is_ok());
    }

    /// Frames written to a file standing in for the connection.
    fn frames_of(path: &Path) -> Vec<Frame> {
        let mut f = File::open(path).expect("open");
        let mut out = Vec::new();
        while let Some(fr) = msb_protocol::frame::read_frame(&mut f).expect("a frame") {
            out.push(fr);
        }
        out
    }

    /// The frames the agent answers `req` with (no write data).
    fn answer(req: FsRequest) -> Vec<Frame> {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("frames");
        let f = File::create(&p).expect("create");
        let w: Writer = std::sync::Arc::new(std::sync::Mutex::new(f));
        serve(1, req, &w, None);
        frames_of(&p)
    }

    fn read_req(p: &Path) -> FsRequest {
        FsRequest::Read {
            path: p.display().to_string(),
        }
    }

    #[test]
    fn a_procfs_file_reads_to_its_end() {
        let frames = answer(FsRequest::Read {
            path: "/proc/self/status".into(),
        });
        let data: Vec<u8> = frames
            .iter()
            .flat_map(|f| match &f.message {
                Message::FsData(d) => d.clone(),
                _ => vec![],
            })
            .collect();
        assert!(matches!(&frames[0].message, Message::FsStat(s) if s.size == 0));
        let text = String::from_utf8(data).expect("utf-8");
        assert!(text.contains("VmRSS:"), "{text}");
        assert!(matches!(
            frames.last().map(|f| &f.message),
            Some(Message::FsDone)
        ));
    }

    #[test]
    fn a_big_directory_lists_in_batches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = dir.path().join("big");
        fs::create_dir(&big).expect("mkdir");
        for i in 0..3000 {
            fs::write(big.join(format!("{i:05}-{}", "n".repeat(200))), b"").expect("write");
        }
        let frames = answer(FsRequest::List {
            path: big.display().to_string(),
        });
        let batches = frames
            .iter()
            .filter(|f| matches!(f.message, Message::FsEntries(_)))
            .count();
        assert!(batches > 1, "{batches} batch(es)");
        let names: Vec<String> = frames
            .iter()
            .flat_map(|f| match &f.message {
                Message::FsEntries(e) => e.iter().map(|e| e.name.clone()).collect(),
                _ => vec![],
            })
            .collect();
        assert_eq!(names.len(), 3000);
        assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted");
        assert!(matches!(
            frames.last().map(|f| &f.message),
            Some(Message::FsDone)
        ));
    }

    #[test]
    fn reads_announce_the_size_and_refuse_what_is_not_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("f");
        fs::write(&file, vec![7u8; FS_CHUNK + 10]).expect("write");
        let frames = answer(read_req(&file));
        assert!(matches!(&frames[0].message, Message::FsStat(s) if s.size == FS_CHUNK as u64 + 10));
        let data: usize = frames
            .iter()
            .map(|f| match &f.message {
                Message::FsData(d) => d.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(data, FS_CHUNK + 10);
        assert!(matches!(
            frames.last().map(|f| &f.message),
            Some(Message::FsDone)
        ));

        // A FIFO nobody writes to: refused at once, not waited on.
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        assert!(matches!(
            answer(read_req(&fifo)).first().map(|f| &f.message),
            Some(Message::Error {
                kind: ErrorKind::InvalidRequest,
                ..
            })
        ));
        assert!(matches!(
            answer(read_req(Path::new("/dev/zero")))
                .first()
                .map(|f| &f.message),
            Some(Message::Error {
                kind: ErrorKind::InvalidRequest,
                ..
            })
        ));
    }

    #[test]
    fn copies_are_atomic_and_not_onto_themselves() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a");
        fs::write(&a, b"contents").expect("write");
        fs::set_permissions(&a, fs::Permissions::from_mode(0o751)).expect("chmod");
        let e = copy(&a, &a).expect_err("onto itself");
        assert_eq!(kind_of(&e), ErrorKind::InvalidRequest);
        assert_eq!(fs::read(&a).expect("read"), b"contents");
        let b = dir.path().join("b");
        copy(&a, &b).expect("copy");
        assert_eq!(fs::read(&b).expect("read"), b"contents");
        assert_eq!(fs::metadata(&b).expect("stat").mode() & 0o7777, 0o751);
        assert_eq!(
            fs::read_dir(dir.path()).expect("ls").count(),
            2,
            "no temporaries"
        );
        // mkdir -p on an existing directory keeps its mode.
        let t = dir.path().join("sticky");
        fs::create_dir(&t).expect("mkdir");
        fs::set_permissions(&t, fs::Permissions::from_mode(0o1777)).expect("chmod");
        mkdir(&t, 0o755, true).expect("mkdir -p");
        assert_eq!(fs::metadata(&t).expect("stat").mode() & 0o7777, 0o1777);
    }

    #[test]
    fn a_write_replaces_only_when_complete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("f");
        fs::write(&target, b"old").expect("write");
        fs::set_permissions(&target, fs::Permissions::from_mode(0o640)).expect("chmod");

        // Abandoned half way: the old contents stay, no temporary file is left.
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        tx.send(b"new".to_vec()).expect("send");
        drop(tx);
        assert!(matches!(write(&target, None, &rx), Ok(None)));
        assert_eq!(fs::read(&target).expect("read"), b"old");
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 1);

        // Complete: new contents, the old mode kept.
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        for c in [b"ne".to_vec(), b"w".to_vec(), vec![]] {
            tx.send(c).expect("send");
        }
        assert!(matches!(
            write(&target, None, &rx),
            Ok(Some(Message::FsDone))
        ));
        assert_eq!(fs::read(&target).expect("read"), b"new");
        let mode = fs::metadata(&target).expect("stat").mode() & 0o7777;
        assert_eq!(mode, 0o640);

        // A mode given replaces the old one.
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        tx.send(vec![]).expect("send");
        assert!(write(&target, Some(0o4711), &rx).is_ok());
        assert_eq!(fs::metadata(&target).expect("stat").mode() & 0o7777, 0o4711);

        // A new file gets the requested mode.
        let fresh = dir.path().join("g");
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        tx.send(vec![]).expect("send");
        assert!(write(&fresh, Some(0o751), &rx).is_ok());
        assert_eq!(fs::metadata(&fresh).expect("stat").mode() & 0o7777, 0o751);

        // A directory is refused.
        let (_tx, rx) = std::sync::mpsc::sync_channel(4);
        let e = write(dir.path(), None, &rx).expect_err("a directory");
        assert_eq!(kind_of(&e), ErrorKind::IsADirectory);
    }
}
