//! Builds what the guest boots: our minimal Linux kernel and the default initramfs.
//!
//! - **Kernel**: Debian's `linux-source-6.12` (installed with apt when missing), configured
//!   as `allnoconfig` plus the fragment in `config/`, built as an uncompressed `vmlinux`
//!   with a PVH entry. Two flavours come from one source: `microvm` (the product kernel, no
//!   patches) and `pvm-compat` (plus `config/pvm-compat.config` and the patches in
//!   `patches/pvm-compat/`, so it runs on `kvm_pvm` hosts).
//! - **Initramfs**: `agentd` built as a static binary as `/init`, written as an
//!   uncompressed newc cpio by [`cpio`]. The agent switches to the root filesystem the VMM
//!   shares over virtio-fs.
//! - **Default root filesystem**: a directory with Debian's `busybox-static` for `/bin/sh`
//!   and the usual tools, the image layer of a sandbox without an image.
//!
//! Results are cached outside the repository (see [`cache_dir`]) under a hash of
//! everything that goes into them, so a second request is instant and a changed config,
//! patch or agent builds anew. Builds print progress on stderr.
#![forbid(unsafe_code)]

pub mod cpio;
mod packages;
mod progress;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

pub use progress::Progress;

/// Bump when the build procedure changes in a way the inputs do not show.
const KERNEL_RECIPE: &str = "kernel-recipe-1";
const INITRAMFS_RECIPE: &str = "initramfs-recipe-3";
const AGENT_DIR_RECIPE: &str = "agent-dir-recipe-1";
const ROOTFS_RECIPE: &str = "rootfs-recipe-1";
const SOURCE_PACKAGE: &str = "linux-source-6.12";
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.12.tar.xz";
const BUILD_PACKAGES: &[&str] = &[
    SOURCE_PACKAGE,
    "make",
    "gcc",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
    "xz-utils",
    "patch",
];
const BUSYBOX: &str = "/bin/busybox";
const AGENTD_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Which kernel to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// The product kernel for hardware KVM: no patches.
    Microvm,
    /// The product config plus our patches for `kvm_pvm` hosts.
    PvmCompat,
}

impl Flavour {
    /// The flavour's name, as used in paths and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Flavour::Microvm => "microvm",
            Flavour::PvmCompat => "pvm-compat",
        }
    }

    /// Parses a flavour name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "microvm" => Some(Flavour::Microvm),
            "pvm-compat" => Some(Flavour::PvmCompat),
            _ => None,
        }
    }
}

/// Failures building guest artifacts.
#[derive(Debug, thiserror::Error)]
pub enum GuestBuildError {
    /// No cache directory could be determined.
    #[error("no cache directory: set MSB_CACHE_DIR or HOME")]
    NoCacheDir,
    /// A file or directory operation failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A required Debian package is missing and could not be installed.
    #[error("required packages are missing: {packages}; install them with `apt-get install -y {packages}` (as root)")]
    MissingPackages {
        /// Space-separated package names.
        packages: String,
    },
    /// An external command failed.
    #[error("`{command}` failed ({status}){}", tail_text(.log_tail))]
    CommandFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Last lines of its output.
        log_tail: Vec<String>,
    },
    /// The generated kernel config lacks symbols the fragment asked for.
    #[error("kernel config did not take these settings (unmet dependencies?): {0:?}")]
    ConfigMismatch(Vec<String>),
    /// A binary that must be static is dynamically linked.
    #[error("{0} is dynamically linked; the initramfs needs a static binary")]
    NotStatic(PathBuf),
}

fn tail_text(lines: &[String]) -> String {
    if lines.is_empty() {
        String::new()
    } else {
        format!(":\n{}", lines.join("\n"))
    }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> GuestBuildError {
    let path = path.to_path_buf();
    move |source| GuestBuildError::Io { what, path, source }
}

/// Where builds are cached: `$MSB_CACHE_DIR`, else `$XDG_CACHE_HOME/microsandbox`, else
/// `~/.cache/microsandbox`.
pub fn cache_dir() -> Result<PathBuf, GuestBuildError> {
    if let Some(d) = std::env::var_os("MSB_CACHE_DIR") {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(d).join("microsandbox"));
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache").join("microsandbox"))
        .ok_or(GuestBuildError::NoCacheDir)
}

/// The `guest-kernel` folder holding `config/` and `patches/` (overridable with
/// `MSB_GUEST_KERNEL_DIR`).
pub fn recipe_dir() -> PathBuf {
    std::env::var_os("MSB_GUEST_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn workspace_dir() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(Path::to_path_buf).unwrap_or(here)
}

/// Everything that determines one kernel build.
#[derive(Debug)]
struct KernelRecipe {
    flavour: Flavour,
    fragment: String,
    patches: Vec<(String, Vec<u8>)>,
}

impl KernelRecipe {
    fn load(flavour: Flavour) -> Result<Self, GuestBuildError> {
        let dir = recipe_dir();
        let read = |p: PathBuf| fs::read_to_string(&p).map_err(io_err("cannot read", &p));
        let mut fragment = read(dir.join("config/microvm.config"))?;
        let mut patches = Vec::new();
        if flavour == Flavour::PvmCompat {
            fragment.push('\n');
            fragment.push_str(&read(dir.join("config/pvm-compat.config"))?);
            let pdir = dir.join("patches/pvm-compat");
            let mut names: Vec<PathBuf> = fs::read_dir(&pdir)
                .map_err(io_err("cannot list", &pdir))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "patch"))
                .collect();
            names.sort();
            for p in names {
                let bytes = fs::read(&p).map_err(io_err("cannot read", &p))?;
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
                patches.push((name.unwrap_or_default(), bytes));
            }
        }
        Ok(KernelRecipe {
            flavour,
            fragment,
            patches,
        })
    }

    fn hash(&self, source_version: &str) -> String {
        let mut h = Sha256::new();
        for part in [
            KERNEL_RECIPE,
            self.flavour.name(),
            source_version,
            &self.fragment,
        ] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        for (name, bytes) in &self.patches {
            h.update(name.as_bytes());
            h.update([0]);
            h.update(bytes);
            h.update([0]);
        }
        hex::encode(&h.finalize()[..8])
    }
}

/// Where a cached kernel of `flavour` is, if it has been built with the current recipe
/// and source. Does not build.
pub fn cached_kernel(flavour: Flavour) -> Result<Option<PathBuf>, GuestBuildError> {
    let Some(version) = packages::installed_version(SOURCE_PACKAGE) else {
        return Ok(None);
    };
    let recipe = KernelRecipe::load(flavour)?;
    let path = kernel_dir(flavour, &recipe.hash(&version))?.join("vmlinux");
    Ok(path.exists().then_some(path))
}

fn kernel_dir(flavour: Flavour, hash: &str) -> Result<PathBuf, GuestBuildError> {
    Ok(cache_dir()?
        .join("kernels")
        .join(format!("{}-{hash}", flavour.name())))
}

fn run(cmd: &mut Command, log: &Path, progress: &mut Progress) -> Result<(), GuestBuildError> {
    let shown = format!("{cmd:?}").replace('"', "");
    let mut logf = fs::File::create(log).map_err(io_err("cannot create", log))?;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err("cannot run", Path::new(&shown)))?;
    // stderr goes to a thread so neither pipe can fill up and stall the child.
    let stderr = child.stderr.take().map(|e| {
        std::thread::spawn(move || {
            let mut lines = Vec::new();
            for l in BufReader::new(e).lines().map_while(Result::ok) {
                lines.push(l);
            }
            lines
        })
    });
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = writeln!(logf, "{line}");
            progress.line(&line);
        }
    }
    let err_lines = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
    for l in &err_lines {
        let _ = writeln!(logf, "{l}");
    }
    let status = child
        .wait()
        .map_err(io_err("cannot wait for", Path::new(&shown)))?;
    if status.success() {
        return Ok(());
    }
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let tail = lines[lines.len().saturating_sub(30)..].to_vec();
    Err(GuestBuildError::CommandFailed {
        command: shown,
        status: status.to_string(),
        log_tail: tail,
    })
}

/// Extracts the pristine source once into the cache; returns its directory.
fn extract_source(version: &str, progress: &mut Progress) -> Result<PathBuf, GuestBuildError> {
    let src_root = cache_dir()?.join("src");
    let dest = src_root.join(format!("{SOURCE_PACKAGE}-{version}"));
    if dest.join("Makefile").exists() {
        return Ok(dest);
    }
    fs::create_dir_all(&src_root).map_err(io_err("cannot create", &src_root))?;
    let tmp = src_root.join(format!(".extract-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(io_err("cannot create", &tmp))?;
    progress.phase("extracting the kernel source");
    run(
        Command::new("tar")
            .args(["-xf", SOURCE_TARBALL, "-C"])
            .arg(&tmp),
        &tmp.with_extension("log"),
        progress,
    )?;
    let inner = tmp.join(SOURCE_PACKAGE);
    let _ = fs::remove_dir_all(&dest);
    fs::rename(&inner, &dest).map_err(io_err("cannot move source to", &dest))?;
    let _ = fs::remove_dir_all(&tmp);
    let _ = fs::remove_file(tmp.with_extension("log"));
    Ok(dest)
}

/// A source tree with the recipe's patches applied, sharing unpatched files with the
/// pristine tree through hard links.
fn patched_tree(
    pristine: &Path,
    work: &Path,
    recipe: &KernelRecipe,
    progress: &mut Progress,
) -> Result<PathBuf, GuestBuildError> {
    if recipe.patches.is_empty() {
        return Ok(pristine.to_path_buf());
    }
    let tree = work.join("src");
    progress.phase("preparing the patched source tree");
    run(
        Command::new("cp").arg("-al").arg(pristine).arg(&tree),
        &work.join("cp.log"),
        progress,
    )?;
    for (name, bytes) in &recipe.patches {
        // Break the hard link of every file the patch touches, so the pristine tree stays
        // pristine whatever `patch` does in place.
        for line in String::from_utf8_lossy(bytes).lines() {
            if let Some(rest) = line.strip_prefix("+++ ") {
                let rel = rest.split_whitespace().next().unwrap_or("");
                let rel = rel.split_once('/').map(|(_, r)| r).unwrap_or(rel);
                let f = tree.join(rel);
                if f.exists() {
                    let data = fs::read(&f).map_err(io_err("cannot read", &f))?;
                    fs::remove_file(&f).map_err(io_err("cannot unlink", &f))?;
                    fs::write(&f, data).map_err(io_err("cannot write", &f))?;
                }
            }
        }
        progress.phase(&format!("applying {name}"));
        let patch_file = work.join(name);
        fs::write(&patch_file, bytes).map_err(io_err("cannot write", &patch_file))?;
        run(
            Command::new("patch")
                .args(["-p1", "--forward", "--batch", "-i"])
                .arg(&patch_file)
                .current_dir(&tree),
            &work.join(format!("{name}.log")),
            progress,
        )?;
    }
    Ok(tree)
}

/// Settings of a fragment that did not make it into `.config`.
fn config_mismatches(fragment: &str, config: &str) -> Vec<String> {
    let have: std::collections::HashMap<&str, &str> = config
        .lines()
        .filter_map(|l| {
            if let Some(sym) = l
                .strip_prefix("# ")
                .and_then(|l| l.strip_suffix(" is not set"))
            {
                Some((sym, "n"))
            } else {
                l.split_once('=')
            }
        })
        .collect();
    // Later lines win, as in Kconfig: pvm-compat.config overrides microvm.config.
    let mut wanted: Vec<(&str, &str)> = Vec::new();
    for line in fragment.lines().map(str::trim) {
        let (sym, want) = if let Some(sym) = line
            .strip_prefix("# ")
            .and_then(|l| l.strip_suffix(" is not set"))
        {
            (sym, "n")
        } else if line.starts_with("CONFIG_") {
            match line.split_once('=') {
                Some(kv) => kv,
                None => continue,
            }
        } else {
            continue;
        };
        wanted.retain(|(s, _)| *s != sym);
        wanted.push((sym, want));
    }
    let mut missing = Vec::new();
    for (sym, want) in wanted {
        let got = have.get(sym).copied().unwrap_or("n");
        if got != want {
            missing.push(format!("{sym}={want} (got {got})"));
        }
    }
    missing
}

/// Returns the cached `vmlinux` of `flavour`, building it first if needed (installs the
/// Debian packages it needs, extracts the source, patches, configures and compiles).
pub fn ensure_kernel(
    flavour: Flavour,
    progress: &mut Progress,
) -> Result<PathBuf, GuestBuildError> {
    // The common case first, without looking at the build packages.
    if let Some(cached) = cached_kernel(flavour)? {
        return Ok(cached);
    }
    packages::ensure(BUILD_PACKAGES, progress)?;
    let version = packages::installed_version(SOURCE_PACKAGE).ok_or_else(|| {
        GuestBuildError::MissingPackages {
            packages: SOURCE_PACKAGE.into(),
        }
    })?;
    let recipe = KernelRecipe::load(flavour)?;
    let hash = recipe.hash(&version);
    let out_dir = kernel_dir(flavour, &hash)?;
    let vmlinux = out_dir.join("vmlinux");
    if vmlinux.exists() {
        return Ok(vmlinux);
    }
    let kernels = cache_dir()?.join("kernels");
    fs::create_dir_all(&kernels).map_err(io_err("cannot create", &kernels))?;
    let lock_path = kernels.join(".lock");
    let lock = fs::File::create(&lock_path).map_err(io_err("cannot create", &lock_path))?;
    progress.phase("waiting for the kernel build lock");
    lock.lock().map_err(io_err("cannot lock", &lock_path))?;
    if vmlinux.exists() {
        return Ok(vmlinux); // another process built it while we waited
    }

    let work = kernels.join(format!("build-{}-{hash}", flavour.name()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(io_err("cannot create", &work))?;
    let pristine = extract_source(&version, progress)?;
    let tree = patched_tree(&pristine, &work, &recipe, progress)?;

    let obj = work.join("obj");
    let fragment = work.join("fragment.config");
    fs::write(&fragment, &recipe.fragment).map_err(io_err("cannot write", &fragment))?;
    progress.phase(&format!(
        "configuring {} (allnoconfig + fragment)",
        flavour.name()
    ));
    run(
        Command::new("make")
            .arg("-C")
            .arg(&tree)
            .arg(format!("O={}", obj.display()))
            .arg("ARCH=x86_64")
            .arg(format!("KCONFIG_ALLCONFIG={}", fragment.display()))
            .arg("allnoconfig"),
        &work.join("config.log"),
        progress,
    )?;
    let config_path = obj.join(".config");
    let config = fs::read_to_string(&config_path).map_err(io_err("cannot read", &config_path))?;
    let missing = config_mismatches(&recipe.fragment, &config);
    if !missing.is_empty() {
        return Err(GuestBuildError::ConfigMismatch(missing));
    }

    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    progress.phase(&format!(
        "compiling vmlinux ({} flavour, -j{jobs})",
        flavour.name()
    ));
    progress.count_lines(true);
    run(
        Command::new("make")
            .arg("-C")
            .arg(&tree)
            .arg(format!("O={}", obj.display()))
            .arg("ARCH=x86_64")
            .arg(format!("-j{jobs}"))
            .arg("vmlinux"),
        &work.join("build.log"),
        progress,
    )?;
    progress.count_lines(false);

    let tmp_out = kernels.join(format!(".out-{}-{hash}", flavour.name()));
    let _ = fs::remove_dir_all(&tmp_out);
    fs::create_dir_all(&tmp_out).map_err(io_err("cannot create", &tmp_out))?;
    for (from, to) in [(obj.join("vmlinux"), "vmlinux"), (config_path, "config")] {
        let dest = tmp_out.join(to);
        fs::copy(&from, &dest).map_err(io_err("cannot copy", &from))?;
    }
    fs::rename(&tmp_out, &out_dir).map_err(io_err("cannot move build to", &out_dir))?;
    let _ = fs::remove_dir_all(&work);
    progress.done(&format!("kernel ready: {}", vmlinux.display()));
    Ok(vmlinux)
}

/// True when the ELF file at `path` has no program interpreter (is statically linked).
fn is_static_elf(bytes: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    if bytes.get(..4) != Some(b"\x7fELF") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let off = phoff as usize + i * usize::from(phentsize);
        u32_at(off).is_some_and(|t| t != PT_INTERP)
    })
}

/// Newest modification time of the files under `dirs` (recursively), if any.
fn newest_mtime(dirs: &[PathBuf]) -> Option<std::time::SystemTime> {
    let mut newest = None;
    let mut stack: Vec<PathBuf> = dirs.to_vec();
    while let Some(p) = stack.pop() {
        let Ok(meta) = fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(rd) = fs::read_dir(&p) {
                stack.extend(rd.filter_map(|e| e.ok().map(|e| e.path())));
            }
        } else if let Ok(m) = meta.modified() {
            newest = newest.max(Some(m));
        }
    }
    newest
}

/// The built agent at `binary` is newer than every source it is built from (the agent
/// and protocol crates and the workspace manifests), so cargo has nothing to do. Asking
/// cargo itself costs ~250 ms at every `msb-vmm` start.
fn agentd_is_fresh(binary: &Path) -> bool {
    let Ok(built) = fs::metadata(binary).and_then(|m| m.modified()) else {
        return false;
    };
    let ws = workspace_dir();
    let inputs = [
        ws.join("agentd"),
        ws.join("protocol"),
        ws.join("Cargo.toml"),
        ws.join("Cargo.lock"),
    ];
    newest_mtime(&inputs).is_some_and(|newest| newest <= built)
}

/// Builds `agentd` as a static binary (or takes `$MSB_AGENTD`) and returns its path.
pub fn build_agentd(progress: &mut Progress) -> Result<PathBuf, GuestBuildError> {
    if let Some(p) = std::env::var_os("MSB_AGENTD") {
        return Ok(PathBuf::from(p));
    }
    let target_dir = cache_dir()?.join("agentd-target");
    let binary = target_dir
        .join(AGENTD_TARGET)
        .join("release")
        .join("msb-agentd");
    if agentd_is_fresh(&binary) {
        return Ok(binary);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    progress.phase("building agentd (static)");
    let log = cache_dir()?.join("agentd-build.log");
    fs::create_dir_all(cache_dir()?).map_err(io_err("cannot create", &cache_dir()?))?;
    run(
        Command::new(cargo)
            .args([
                "build",
                "--release",
                "--quiet",
                "-p",
                "msb-agentd",
                "--target",
                AGENTD_TARGET,
            ])
            .arg("--target-dir")
            .arg(&target_dir)
            .arg("--manifest-path")
            .arg(workspace_dir().join("Cargo.toml"))
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            // Every byte of the initramfs is copied by the guest kernel at each boot.
            .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
            .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_BUILD_TARGET")
            .env_remove("CARGO_TARGET_DIR"),
        &log,
        progress,
    )?;
    Ok(binary)
}

fn busybox_applets() -> Result<Vec<String>, GuestBuildError> {
    let out = Command::new(BUSYBOX)
        .arg("--list-full")
        .output()
        .map_err(io_err("cannot run", Path::new(BUSYBOX)))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().trim_start_matches('/').to_string())
        .filter(|l| !l.is_empty() && l != "bin/busybox" && !l.contains(".."))
        .collect())
}

/// The members of the initramfs: `agentd` as `/init` and the mount points it needs before
/// it switches to the root filesystem (which the VMM shares over virtio-fs).
pub fn initramfs_entries(agentd: Vec<u8>) -> Vec<cpio::Entry> {
    use cpio::{Entry, Kind};
    let mut entries: Vec<Entry> = ["dev", "proc", "sys", "mnt", "mnt/msb-fs", "mnt/msb-root"]
        .into_iter()
        .map(|d| Entry {
            path: d.into(),
            perm: 0o755,
            kind: Kind::Dir,
        })
        .collect();
    entries.push(Entry {
        path: "dev/console".into(),
        perm: 0o600,
        kind: Kind::CharDev(5, 1),
    });
    entries.push(Entry {
        path: "init".into(),
        perm: 0o755,
        kind: Kind::File(agentd),
    });
    entries
}

/// The members of the default root filesystem: Debian's static busybox with its applet
/// links, `/etc/passwd` and `/etc/group` (root and nobody), and the usual directories.
pub fn rootfs_entries(busybox: Vec<u8>, applets: &[String]) -> Vec<cpio::Entry> {
    use cpio::{Entry, Kind};
    let dir = |p: &str, perm| Entry {
        path: p.into(),
        perm,
        kind: Kind::Dir,
    };
    let file = |p: &str, perm, data: Vec<u8>| Entry {
        path: p.into(),
        perm,
        kind: Kind::File(data),
    };
    let mut entries = vec![];
    for d in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "root", "etc", "run",
        "var", "mnt",
    ] {
        entries.push(dir(d, 0o755));
    }
    entries.push(dir("tmp", 0o1777));
    entries.push(file("bin/busybox", 0o755, busybox));
    entries.push(file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
            .to_vec(),
    ));
    entries.push(file(
        "etc/group",
        0o644,
        b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
    ));
    for a in applets {
        entries.push(Entry {
            path: a.clone(),
            perm: 0o777,
            kind: Kind::Symlink("/bin/busybox".into()),
        });
    }
    entries
}

/// Writes `entries` under `dir` (character devices are left out: the guest mounts devtmpfs).
fn write_tree(dir: &Path, entries: &[cpio::Entry]) -> Result<(), GuestBuildError> {
    use std::os::unix::fs::PermissionsExt;
    for e in entries {
        let p = dir.join(&e.path);
        match &e.kind {
            cpio::Kind::Dir => fs::create_dir_all(&p).map_err(io_err("cannot create", &p))?,
            cpio::Kind::File(data) => fs::write(&p, data).map_err(io_err("cannot write", &p))?,
            cpio::Kind::Symlink(target) => {
                std::os::unix::fs::symlink(target, &p).map_err(io_err("cannot link", &p))?
            }
            cpio::Kind::CharDev(..) => continue,
        }
        if !matches!(e.kind, cpio::Kind::Symlink(_)) {
            fs::set_permissions(&p, fs::Permissions::from_mode(e.perm))
                .map_err(io_err("cannot set the mode of", &p))?;
        }
    }
    Ok(())
}

/// Writes `entries` into a temporary directory of this call's own under `dir` (two builds
/// at once, in threads or processes, never share or remove each other's tree) and renames
/// it to `path`: the tree is complete or absent. When another build finished `path`
/// first, that one is used. `what` names a failed move.
fn publish_tree(
    dir: &Path,
    path: &Path,
    entries: &[cpio::Entry],
    what: &'static str,
) -> Result<(), GuestBuildError> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".tmp-{}-{nanos:x}-{seq}", std::process::id()));
    fs::create_dir(&tmp).map_err(io_err("cannot create", &tmp))?;
    if let Err(e) = write_tree(&tmp, entries) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    match fs::rename(&tmp, path) {
        Ok(()) => Ok(()),
        Err(_) if path.is_dir() => {
            let _ = fs::remove_dir_all(&tmp);
            Ok(())
        }
        Err(e) => Err(io_err(what, path)(e)),
    }
}

/// Removes every entry of `dir` named `prefix*` other than `keep`.
fn remove_stale(dir: &Path, prefix: &str, keep: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if p != keep && name.starts_with(prefix) {
                let _ = if p.is_dir() {
                    fs::remove_dir_all(p)
                } else {
                    fs::remove_file(p)
                };
            }
        }
    }
}

/// The static agent's bytes (built if needed) and a short hash of them under `recipe`.
fn agentd_with_hash(
    recipe: &str,
    progress: &mut Progress,
) -> Result<(Vec<u8>, String), GuestBuildError> {
    let path = build_agentd(progress)?;
    let agentd = fs::read(&path).map_err(io_err("cannot read", &path))?;
    if !is_static_elf(&agentd) {
        return Err(GuestBuildError::NotStatic(path));
    }
    let mut h = Sha256::new();
    h.update(recipe.as_bytes());
    h.update(&agentd);
    Ok((agentd, hex::encode(&h.finalize()[..8])))
}

/// Returns the cached agent directory, assembling it first if needed: what the initramfs
/// holds (`agentd` as `/init` and the mount points it needs before it switches to the
/// sandbox's root), as a directory the VMM shares read-only over virtio-fs as the guest
/// kernel's root (`root=msbinit rootfstype=virtiofs`). The guest reads the agent's pages
/// on demand, copied by the host, where an initramfs is unpacked by the guest kernel at
/// every boot (seconds where that code is emulated).
pub fn ensure_agent_dir(progress: &mut Progress) -> Result<PathBuf, GuestBuildError> {
    let (agentd, hash) = agentd_with_hash(AGENT_DIR_RECIPE, progress)?;
    let dir = cache_dir()?.join("agent");
    let path = dir.join(format!("agent-{hash}"));
    if path.is_dir() {
        return Ok(path);
    }
    fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
    progress.phase("assembling the agent directory");
    publish_tree(
        &dir,
        &path,
        &initramfs_entries(agentd),
        "cannot move the agent directory to",
    )?;
    // Older directories may be the root of running sandboxes; they are small, so they
    // stay (the cache can be emptied when no sandbox runs).
    progress.done(&format!("agent directory ready: {}", path.display()));
    Ok(path)
}

/// Returns the cached initramfs (just `agentd`), assembling it first if needed.
pub fn ensure_initramfs(progress: &mut Progress) -> Result<PathBuf, GuestBuildError> {
    let (agentd, hash) = agentd_with_hash(INITRAMFS_RECIPE, progress)?;
    let dir = cache_dir()?.join("initramfs");
    let path = dir.join(format!("initramfs-{hash}.cpio"));
    if path.exists() {
        return Ok(path);
    }
    fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
    progress.phase("assembling the initramfs");
    let tmp = dir.join(format!(".tmp-{}", std::process::id()));
    let mut f =
        std::io::BufWriter::new(fs::File::create(&tmp).map_err(io_err("cannot create", &tmp))?);
    cpio::write_archive(&mut f, &initramfs_entries(agentd))
        .and_then(|_| f.flush())
        .map_err(io_err("cannot write", &tmp))?;
    drop(f);
    fs::rename(&tmp, &path).map_err(io_err("cannot move initramfs to", &path))?;
    // Older archives are stale now (nobody holds them open: the VMM reads them whole).
    remove_stale(&dir, "initramfs-", &path);
    progress.done(&format!("initramfs ready: {}", path.display()));
    Ok(path)
}

/// Returns the cached default root filesystem (a directory the VMM shares read-only as the
/// image layer of a sandbox without an image), assembling it first if needed.
pub fn ensure_rootfs(progress: &mut Progress) -> Result<PathBuf, GuestBuildError> {
    // The tree's name hashes busybox's bytes and applets; a link named after busybox's
    // file identity (and the recipe) finds it without reading them again.
    let dir = cache_dir()?.join("rootfs");
    let quick = fs::metadata(BUSYBOX).ok().map(|m| {
        use std::os::unix::fs::MetadataExt;
        let mut h = Sha256::new();
        h.update(ROOTFS_RECIPE.as_bytes());
        h.update(format!("{}:{}:{}:{}", m.dev(), m.ino(), m.len(), m.mtime_nsec()).as_bytes());
        h.update(m.mtime().to_le_bytes());
        dir.join(format!("by-file-{}", hex::encode(&h.finalize()[..8])))
    });
    if let Some(link) = &quick {
        if let Ok(target) = fs::read_link(link) {
            let path = dir.join(target);
            if path.is_dir() {
                return Ok(path);
            }
        }
    }
    packages::ensure(&["busybox-static"], progress)?;
    let busybox = fs::read(BUSYBOX).map_err(io_err("cannot read", Path::new(BUSYBOX)))?;
    if !is_static_elf(&busybox) {
        return Err(GuestBuildError::NotStatic(BUSYBOX.into()));
    }
    let applets = busybox_applets()?;
    let mut h = Sha256::new();
    h.update(ROOTFS_RECIPE.as_bytes());
    h.update(&busybox);
    h.update(applets.join("\n").as_bytes());
    let hash = hex::encode(&h.finalize()[..8]);
    let name = format!("default-{hash}");
    let path = dir.join(&name);
    let remember = |quick: &Option<PathBuf>| {
        if let Some(link) = quick {
            // Atomic: a temporary link renamed over the old one.
            let tmp = dir.join(format!(".link-{}", std::process::id()));
            let _ = fs::remove_file(&tmp);
            if std::os::unix::fs::symlink(&name, &tmp).is_ok() && fs::rename(&tmp, link).is_err() {
                let _ = fs::remove_file(&tmp);
            }
        }
    };
    if path.is_dir() {
        remember(&quick);
        return Ok(path);
    }
    fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
    progress.phase("assembling the default root filesystem");
    publish_tree(
        &dir,
        &path,
        &rootfs_entries(busybox, &applets),
        "cannot move the root filesystem to",
    )?;
    remember(&quick);
    // Older trees may still be in use by running sandboxes; they are small, so keep them.
    progress.done(&format!("root filesystem ready: {}", path.display()));
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_check_spots_dropped_symbols() {
        let fragment = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\nCONFIG_N=100\nCONFIG_D=n\nCONFIG_E=y\n# CONFIG_E is not set\n";
        let config = "CONFIG_A=y\nCONFIG_B=y\nCONFIG_N=100\n";
        assert_eq!(
            config_mismatches(fragment, config),
            vec!["CONFIG_B=n (got y)", "CONFIG_C=y (got n)"]
        );
    }

    #[test]
    fn static_detection() {
        let host_sh = fs::read("/bin/sh").expect("a shell");
        assert!(!is_static_elf(&host_sh), "/bin/sh on Debian is dynamic");
        assert!(!is_static_elf(b"not an elf"));
    }

    #[test]
    fn recipes_differ_by_flavour_and_inputs() {
        let a = KernelRecipe::load(Flavour::Microvm).expect("recipe files");
        let b = KernelRecipe::load(Flavour::PvmCompat).expect("recipe files");
        assert_ne!(a.hash("1"), b.hash("1"));
        assert_ne!(a.hash("1"), a.hash("2"));
        assert_eq!(a.hash("1"), a.hash("1"));
    }
}
