//! The bottom of the SDK: where everything of a sandbox lives on the host (the state
//! directory [`msb_home`], a sandbox's [`Paths`], [`private_dir`]), sandbox names
//! ([`validate_name`]), and the defaults and limits the other files share.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{MicrosandboxError, MicrosandboxResult};

/// Longest sandbox name, bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Default guest memory.
pub const DEFAULT_MEMORY_MIB: u32 = 512;
/// Default shell for [`Sandbox::shell`](crate::Sandbox::shell).
pub const DEFAULT_SHELL: &str = "/bin/sh";
/// Longest Unix socket path (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 100;
/// Most bind and named volumes: one virtio-fs device each, on the VMM's interrupt lines
/// besides the root's, the agent directory's and the network device's.
pub const MAX_SHARED_VOLUMES: usize = 15;
/// Default for [`SandboxFs::read_limit`](crate::SandboxFs::read_limit): the most bytes
/// [`SandboxFs::read`](crate::SandboxFs::read) holds in memory. The guest announces a
/// file's size and sends it; believed without a bound, a hostile guest makes the
/// application allocate whatever it names.
pub const DEFAULT_FS_READ_LIMIT: u64 = 1 << 30;
/// Default for [`ExecOptions::output_limit`](crate::ExecOptions::output_limit): the most
/// bytes of stdout, and of stderr, that the collecting exec calls keep in memory (a
/// command can print without end).
pub const DEFAULT_EXEC_OUTPUT_LIMIT: u64 = 256 << 20;

/// A size in MiB (guest memory, tmpfs sizes). Written like the reference's sizes:
/// `512.mib()` and `2.gib()` need a typed literal in Rust (`512u32.mib()`, see [`SizeExt`]),
/// or `Mebibytes::mib(512)` / `Mebibytes::gib(2)`; a plain `u32` is MiB too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mebibytes(pub u32);

impl Mebibytes {
    /// `n` MiB.
    pub const fn mib(n: u32) -> Self {
        Mebibytes(n)
    }

    /// `n` GiB (saturating at `u32::MAX` MiB).
    pub const fn gib(n: u32) -> Self {
        Mebibytes(n.saturating_mul(1024))
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        (self.0 as u64) << 20
    }
}

impl From<u32> for Mebibytes {
    fn from(mib: u32) -> Self {
        Mebibytes(mib)
    }
}

impl std::fmt::Display for Mebibytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 >= 1024 && self.0.is_multiple_of(1024) {
            write!(f, "{} GiB", self.0 / 1024)
        } else {
            write!(f, "{} MiB", self.0)
        }
    }
}

/// Sizes from numbers: `512u32.mib()`, `2u32.gib()` (Rust cannot call a trait method on an
/// untyped literal, so the literal carries its type).
pub trait SizeExt {
    /// This many MiB.
    fn mib(self) -> Mebibytes;
    /// This many GiB.
    fn gib(self) -> Mebibytes;
}

impl SizeExt for u32 {
    fn mib(self) -> Mebibytes {
        Mebibytes::mib(self)
    }
    fn gib(self) -> Mebibytes {
        Mebibytes::gib(self)
    }
}

/// The state directory: `$MSB_HOME`, else `~/.microsandbox`, else (no `HOME`)
/// `/tmp/.microsandbox-<uid>`. It must belong to this user and be writable by nobody else
/// (see [`MicrosandboxError::UntrustedDirectory`]); the SDK creates it mode 0700.
pub fn msb_home() -> PathBuf {
    match std::env::var_os("MSB_HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h),
        _ => match std::env::var_os("HOME") {
            Some(h) if !h.is_empty() => PathBuf::from(h).join(".microsandbox"),
            // Shared by every user: one name each, so one user's cannot stand in another's
            // way (and one made by someone else is refused, not used).
            _ => PathBuf::from(format!(
                "/tmp/.microsandbox-{}",
                rustix::process::geteuid().as_raw()
            )),
        },
    }
}

/// Checks a sandbox name: non-empty, at most 128 bytes of UTF-8, and none of what would
/// break a path or a line of output: `/`, NUL, other control characters, `.` or `..`.
/// Names are kept as given (in the state database, `list`, logs); on disk each has a
/// safe directory name of its own (see [`Paths`]).
pub fn validate_name(name: &str) -> MicrosandboxResult<()> {
    let bad = |reason| {
        Err(MicrosandboxError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("it is longer than 128 bytes");
    }
    if name == "." || name == ".." {
        return bad("it names a directory ('.' or '..')");
    }
    if name.contains('/') {
        return bad("it contains '/'");
    }
    if name.chars().any(char::is_control) {
        return bad("it contains a control character (NUL, newline, ...)");
    }
    Ok(())
}

/// Checks a name that is itself a file name (volumes, snapshots): non-empty, at most 128
/// bytes, ASCII letters, digits, `-`, `_`, `.`, not starting with `.`.
pub(crate) fn validate_plain_name(name: &str) -> MicrosandboxResult<()> {
    validate_name(name)?;
    let bad = |reason| {
        Err(MicrosandboxError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.starts_with('.') {
        return bad("it starts with '.'");
    }
    if !name.bytes().all(is_plain_byte) {
        return bad("use only letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

fn is_plain_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

/// The directory name of a (valid) sandbox name: a plain name is its own; any other is
/// percent-encoded (`café` is `caf%C3%A9`, `.x` is `%2Ex`), or, when that would pass 255
/// bytes, `%%` and its SHA-256. Plain names have no `%` and an encoding has no `%%`, so
/// no two names share a directory.
pub(crate) fn dir_name(name: &str) -> std::borrow::Cow<'_, str> {
    if !name.starts_with('.') && name.bytes().all(is_plain_byte) {
        return std::borrow::Cow::Borrowed(name);
    }
    let mut out = String::with_capacity(name.len() * 3);
    for (i, b) in name.bytes().enumerate() {
        if is_plain_byte(b) && !(i == 0 && b == b'.') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.len() > 255 {
        out = format!("%%{}", hex::encode(Sha256::digest(name.as_bytes())));
    }
    std::borrow::Cow::Owned(out)
}

/// Where a sandbox keeps its files.
#[derive(Debug, Clone)]
pub(crate) struct Paths {
    /// `$MSB_HOME/sandboxes/<name>`: exec.log, console.log, vmm.log.
    pub dir: PathBuf,
    /// `$MSB_HOME/run/<hash>.sock`: short enough for `sun_path` whatever the name.
    pub control: PathBuf,
}

impl Paths {
    pub fn for_name(name: &str) -> MicrosandboxResult<Paths> {
        Paths::in_home(&msb_home(), name)
    }

    /// The paths of `name` under the state directory `home`.
    pub fn in_home(home: &Path, name: &str) -> MicrosandboxResult<Paths> {
        let hash = hex::encode(&Sha256::digest(name.as_bytes())[..8]);
        let control = home.join("run").join(format!("{hash}.sock"));
        // msb-vmm adds ".vsock" (and the device "_<port>") beside it.
        if control.as_os_str().len() + 12 > MAX_SOCKET_PATH {
            return Err(MicrosandboxError::InvalidConfig(format!(
                "MSB_HOME {} is too long for the sandbox's sockets",
                home.display()
            )));
        }
        Ok(Paths {
            dir: home.join("sandboxes").join(&*dir_name(name)),
            control,
        })
    }

    pub fn exec_log(&self) -> PathBuf {
        self.dir.join("exec.log")
    }

    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }

    /// The writable layer shared with the guest: `upper/` and overlayfs' `work/`.
    pub fn rw(&self) -> PathBuf {
        self.dir.join("rw")
    }

    /// The secrets' values (owner only), read by the VMM at each start.
    pub fn secrets(&self) -> PathBuf {
        self.dir.join("secrets.json")
    }

    /// The persisted configuration.
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// The file the sandbox's VMM holds an exclusive `flock` on while it runs.
    pub fn lock(&self) -> PathBuf {
        self.dir.join("lock")
    }

    /// How the VMM ended (written by it as it exits).
    pub fn exit_record(&self) -> PathBuf {
        self.dir.join("vmm-exit.json")
    }

    /// Written before the SDK kills the VMM: whoever sees the end next records it as a
    /// kill that was asked for (a VMM killed with SIGKILL writes no exit record).
    pub fn kill_request(&self) -> PathBuf {
        self.dir.join("kill-requested")
    }

    /// The VMM's metrics snapshot, rewritten every second while it runs.
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.json")
    }
}

/// Creates `dir` (and its missing parents) mode 0700 if it is not there, then makes sure
/// that it and its parent (the state directory: every caller names a directory right
/// under it) are ours alone ([`check_private`]). Everything a sandbox is (its root, its
/// sockets, the state database) lives under these, so a directory another user can write
/// to, or one they made for us (`/tmp` is shared), is refused rather than used.
pub(crate) fn private_dir(dir: &Path) -> MicrosandboxResult<()> {
    use std::os::unix::fs::DirBuilderExt;
    if std::fs::symlink_metadata(dir).is_err() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    if let Some(home) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        check_private(home)?;
    }
    check_private(dir)
}

/// Refuses a directory another user could change under us: one not owned by this user
/// (its effective uid), or writable by its group or by others. A symlink is followed (a
/// state directory kept elsewhere is fine) if it belongs to this user or to root.
pub(crate) fn check_private(path: &Path) -> MicrosandboxResult<()> {
    use std::os::unix::fs::MetadataExt;
    let refuse = |reason: String| {
        Err(MicrosandboxError::UntrustedDirectory {
            path: path.to_path_buf(),
            reason,
        })
    };
    let uid = rustix::process::geteuid().as_raw();
    let link = std::fs::symlink_metadata(path)?;
    if link.file_type().is_symlink() && link.uid() != uid && link.uid() != 0 {
        return refuse(format!("it is a symlink owned by uid {}", link.uid()));
    }
    let meta = std::fs::metadata(path)?;
    if !meta.is_dir() {
        return refuse("it is not a directory".into());
    }
    if meta.uid() != uid {
        return refuse(format!(
            "it is owned by uid {}, not by this user (uid {uid})",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return refuse(format!(
            "its mode {:04o} lets other users write to it (chmod go-w)",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod size_tests {
    use super::*;

    #[test]
    fn sizes_read_like_the_reference() {
        assert_eq!(512u32.mib(), Mebibytes(512));
        assert_eq!(2u32.gib(), Mebibytes(2048));
        assert_eq!(Mebibytes::gib(u32::MAX), Mebibytes(u32::MAX));
        assert_eq!(Mebibytes::gib(2).bytes(), 2 << 30);
        assert_eq!(Mebibytes::gib(2).to_string(), "2 GiB");
        assert_eq!(Mebibytes::mib(1536).to_string(), "1536 MiB");
        let m: Mebibytes = 256.into();
        assert_eq!(m, Mebibytes::mib(256));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in [
            "api",
            "a.b-c_d",
            &"x".repeat(128),
            "ü",
            "a b",
            ".hidden",
            "日本語",
        ] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../x",
            "a\0b",
            "a\nb",
            &"x".repeat(129),
        ] {
            assert!(
                matches!(
                    validate_name(bad),
                    Err(MicrosandboxError::InvalidName { .. })
                ),
                "{bad:?}"
            );
        }
        // 43 three-byte characters: 129 bytes.
        assert!(validate_name(&"語".repeat(43)).is_err());
        assert!(validate_name(&"語".repeat(42)).is_ok());
        for plain_bad in [".hidden", "a b", "ü"] {
            assert!(validate_plain_name(plain_bad).is_err(), "{plain_bad}");
        }
        assert!(validate_plain_name("vol-1.data").is_ok());
    }

    #[test]
    fn every_name_gets_its_own_safe_directory() {
        let names = [
            "api".to_string(),
            "caf\u{e9}".to_string(),
            "caf%C3%A9".to_string(),
            ".x".to_string(),
            "%2Ex".to_string(),
            "a b".to_string(),
            "语".repeat(42),
            "语".repeat(41),
            "\u{1F600}".repeat(32),
        ];
        let mut seen = std::collections::HashSet::new();
        for n in &names {
            assert!(validate_name(n).is_ok(), "{n}");
            let d = dir_name(n);
            assert!(!d.is_empty() && d.len() <= 255, "{n}: {d}");
            assert!(!d.starts_with('.') && !d.contains('/') && d != "..", "{d}");
            assert!(d.bytes().all(|b| is_plain_byte(b) || b == b'%'), "{d}");
            assert!(seen.insert(d.into_owned()), "{n} shares a directory");
        }
        assert_eq!(dir_name("api"), "api");
        assert_eq!(dir_name("caf\u{e9}"), "caf%C3%A9");
        assert_eq!(dir_name(".x"), "%2Ex");
        assert!(dir_name(&"语".repeat(42)).starts_with("%%"));
    }

    #[test]
    fn private_dirs_are_made_0700_and_foreign_or_writable_ones_refused() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o7777;
        let tmp = tempfile::tempdir().expect("tempdir");
        let home = tmp.path().join("home");
        // Missing: the state directory and the subdirectory are made ours alone.
        private_dir(&home.join("run")).expect("created");
        assert_eq!((mode(&home), mode(&home.join("run"))), (0o700, 0o700));
        // Existing and private: fine, again and again.
        private_dir(&home.join("run")).expect("existing");

        // Writable by others: the subdirectory, or the state directory above it.
        let set = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod")
        };
        for (target, m) in [(home.join("run"), 0o777), (home.clone(), 0o770)] {
            set(&target, m);
            let err = private_dir(&home.join("run")).expect_err("refused");
            assert!(
                matches!(&err, MicrosandboxError::UntrustedDirectory { path, .. } if *path == target),
                "{err:?}"
            );
            set(&target, 0o700);
        }
        private_dir(&home.join("run")).expect("private again");

        // Not a directory.
        std::fs::write(home.join("file"), "").expect("file");
        assert!(matches!(
            private_dir(&home.join("file")),
            Err(MicrosandboxError::UntrustedDirectory { .. })
        ));

        // Owned by someone else: "/" is root's (unless these tests run as root).
        if rustix::process::geteuid().as_raw() != 0 {
            assert!(matches!(
                check_private(Path::new("/")),
                Err(MicrosandboxError::UntrustedDirectory { .. })
            ));
        }
    }

    #[test]
    fn socket_paths_stay_short_for_long_names() {
        let p = Paths::for_name(&"n".repeat(128)).expect("paths");
        assert!(p.control.as_os_str().len() <= MAX_SOCKET_PATH);
        assert!(p.dir.ends_with("n".repeat(128)));
    }
}
