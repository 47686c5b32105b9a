//! Rootfs patches: changes written into a sandbox's writable upper directory before its
//! first boot, so the image layers stay untouched.
//!
//! Patches apply in order, each seeing the ones before it. `mkdir` and `remove` are
//! idempotent; the others refuse a path that already exists (in the image or written by an
//! earlier patch) unless `replace` is set. Removing a path that lives in an image layer
//! writes an overlayfs whiteout; replacing an image directory with a new one marks the new
//! one opaque; appending to an image file copies it up first.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::view::{components, MergedView, Node, OPAQUE_XATTR};

/// Mode of a file a patch writes when none is given.
const DEFAULT_FILE_MODE: u32 = 0o644;
/// Mode of a directory a patch creates when none is given.
const DEFAULT_DIR_MODE: u32 = 0o755;

/// One rootfs patch (see [`PatchBuilder`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Patch {
    /// Write text to a file.
    Text {
        /// Absolute guest path.
        path: String,
        /// Contents.
        content: String,
        /// Permission bits (default 0644).
        mode: Option<u32>,
        /// Overwrite a path that exists.
        replace: bool,
    },
    /// Write bytes to a file.
    File {
        /// Absolute guest path.
        path: String,
        /// Contents.
        content: Vec<u8>,
        /// Permission bits (default 0644).
        mode: Option<u32>,
        /// Overwrite a path that exists.
        replace: bool,
    },
    /// Append text to an existing file (copied up first when it lives in the image).
    Append {
        /// Absolute guest path.
        path: String,
        /// Text to append.
        content: String,
    },
    /// Create a directory and any missing parents (an existing directory is fine).
    Mkdir {
        /// Absolute guest path.
        path: String,
        /// Permission bits (default 0755).
        mode: Option<u32>,
    },
    /// Remove a file or directory (a missing path is fine).
    Remove {
        /// Absolute guest path.
        path: String,
    },
    /// Create a symlink at `link` pointing to `target`.
    Symlink {
        /// What the link points to (taken as is).
        target: String,
        /// Absolute guest path of the link.
        link: String,
        /// Overwrite a path that exists.
        replace: bool,
    },
    /// Copy a host file into the rootfs.
    CopyFile {
        /// Host file.
        src: PathBuf,
        /// Absolute guest destination.
        dst: String,
        /// Permission bits (default: the source's).
        mode: Option<u32>,
        /// Overwrite a path that exists.
        replace: bool,
    },
    /// Copy a host directory, recursively, into the rootfs (symlinks are copied as links,
    /// never followed; sockets and devices are skipped).
    CopyDir {
        /// Host directory.
        src: PathBuf,
        /// Absolute guest destination.
        dst: String,
        /// Overwrite a path that exists.
        replace: bool,
    },
}

impl Patch {
    /// The guest path the patch writes.
    pub fn path(&self) -> &str {
        match self {
            Patch::Text { path, .. }
            | Patch::File { path, .. }
            | Patch::Append { path, .. }
            | Patch::Mkdir { path, .. }
            | Patch::Remove { path } => path,
            Patch::Symlink { link, .. } => link,
            Patch::CopyFile { dst, .. } | Patch::CopyDir { dst, .. } => dst,
        }
    }
}

/// Collects patches for [`SandboxBuilder::patch`](crate::SandboxBuilder::patch).
#[derive(Debug, Clone, Default)]
pub struct PatchBuilder {
    pub(crate) patches: Vec<Patch>,
}

impl PatchBuilder {
    fn push(mut self, p: Patch) -> Self {
        self.patches.push(p);
        self
    }

    /// Writes `content` to `path` (mode default 0644); `replace` allows overwriting.
    pub fn text(
        self,
        path: impl Into<String>,
        content: impl Into<String>,
        mode: Option<u32>,
        replace: bool,
    ) -> Self {
        self.push(Patch::Text {
            path: path.into(),
            content: content.into(),
            mode,
            replace,
        })
    }

    /// Writes raw bytes to `path` (mode default 0644); `replace` allows overwriting.
    pub fn file(
        self,
        path: impl Into<String>,
        content: impl Into<Vec<u8>>,
        mode: Option<u32>,
        replace: bool,
    ) -> Self {
        self.push(Patch::File {
            path: path.into(),
            content: content.into(),
            mode,
            replace,
        })
    }

    /// Appends `content` to the existing file at `path`.
    pub fn append(self, path: impl Into<String>, content: impl Into<String>) -> Self {
        self.push(Patch::Append {
            path: path.into(),
            content: content.into(),
        })
    }

    /// Creates the directory `path` (and missing parents; mode default 0755). Idempotent.
    pub fn mkdir(self, path: impl Into<String>, mode: Option<u32>) -> Self {
        self.push(Patch::Mkdir {
            path: path.into(),
            mode,
        })
    }

    /// Removes the file or directory at `path`. Idempotent.
    pub fn remove(self, path: impl Into<String>) -> Self {
        self.push(Patch::Remove { path: path.into() })
    }

    /// Creates a symlink at `link` pointing to `target`; `replace` allows overwriting.
    pub fn symlink(
        self,
        target: impl Into<String>,
        link: impl Into<String>,
        replace: bool,
    ) -> Self {
        self.push(Patch::Symlink {
            target: target.into(),
            link: link.into(),
            replace,
        })
    }

    /// Copies the host file `src` to `dst` (mode default: the source's).
    pub fn copy_file(
        self,
        src: impl Into<PathBuf>,
        dst: impl Into<String>,
        mode: Option<u32>,
        replace: bool,
    ) -> Self {
        self.push(Patch::CopyFile {
            src: src.into(),
            dst: dst.into(),
            mode,
            replace,
        })
    }

    /// Copies the host directory `src` recursively to `dst`.
    pub fn copy_dir(self, src: impl Into<PathBuf>, dst: impl Into<String>, replace: bool) -> Self {
        self.push(Patch::CopyDir {
            src: src.into(),
            dst: dst.into(),
            replace,
        })
    }
}

/// Why a patch failed.
#[derive(Debug)]
pub(crate) enum PatchFailure {
    /// The target exists and the patch does not replace.
    Exists,
    /// Anything else, with the reason.
    Failed(String),
}

impl From<io::Error> for PatchFailure {
    fn from(e: io::Error) -> Self {
        PatchFailure::Failed(e.to_string())
    }
}

fn failed<T>(msg: impl Into<String>) -> Result<T, PatchFailure> {
    Err(PatchFailure::Failed(msg.into()))
}

/// Checks a patch's guest path: absolute, no `..`, not the root.
pub(crate) fn check_guest_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("{p:?} is not an absolute path"));
    }
    if p.contains('\0') {
        return Err(format!("{p:?} contains a NUL byte"));
    }
    let comps = components(p);
    if comps.iter().any(|c| c == "..") {
        return Err(format!("{p:?} contains '..'"));
    }
    if comps.is_empty() {
        return Err("the root itself cannot be patched".into());
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7777))
}

/// Owner changes need privileges; without them files belong to the caller, as they would.
fn chown_like(path: &Path, meta: &fs::Metadata) {
    let _ = std::os::unix::fs::lchown(path, Some(meta.uid()), Some(meta.gid()));
}

fn whiteout(path: &Path) -> io::Result<()> {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::empty(),
        0,
    )
    .map_err(io::Error::from)
}

fn mark_opaque(path: &Path) -> io::Result<()> {
    rustix::fs::lsetxattr(path, OPAQUE_XATTR, b"y", rustix::fs::XattrFlags::empty())
        .map_err(io::Error::from)
}

/// Removes whatever the upper has at `p` (file, link, whiteout or directory tree).
fn clear_upper(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Applies patches to one upper directory over its image layers.
pub(crate) struct Patcher {
    upper: PathBuf,
    /// The guest's view: the upper over the image.
    view: MergedView,
    /// The image alone (what a whiteout must hide, what an opaque directory covers).
    image: MergedView,
}

fn guest_path(comps: &[String]) -> String {
    format!("/{}", comps.join("/"))
}

impl Patcher {
    /// A patcher for `upper` over `lowers` (bottom first).
    pub(crate) fn new(upper: &Path, lowers: &[PathBuf]) -> Self {
        Patcher {
            upper: upper.to_path_buf(),
            view: MergedView::new(upper, lowers),
            image: MergedView::image(lowers),
        }
    }

    /// What the image alone has at `comps` (an upper entry may hide it).
    fn in_image(&self, comps: &[String]) -> Result<Option<Node>, PatchFailure> {
        match self.image.resolve(&guest_path(comps), false) {
            Ok((_, node)) => Ok(node),
            // A path the image cannot even resolve (through a file) is not in it.
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Makes sure the directory `comps` exists in the upper: directories the image has are
    /// copied up (mode and owner), missing ones are created with mode 0755, a directory
    /// whited out in the upper is recreated opaque.
    fn upper_dir(&self, comps: &[String]) -> Result<PathBuf, PatchFailure> {
        let mut host = self.upper.clone();
        for i in 0..comps.len() {
            host.push(&comps[i]);
            let guest = format!("/{}", comps[..=i].join("/"));
            match fs::symlink_metadata(&host) {
                Ok(m) if m.is_dir() => continue,
                Ok(m) if super::view::is_whiteout(&m) => {
                    fs::remove_file(&host)?;
                    fs::create_dir(&host)?;
                    set_mode(&host, DEFAULT_DIR_MODE)?;
                    mark_opaque(&host)?;
                    continue;
                }
                Ok(_) => return failed(format!("{guest} is not a directory")),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            match self.view.resolve(&guest, false)? {
                (_, Some(Node::Dir(parts))) => {
                    let (_, lower) = parts
                        .iter()
                        .find(|(layer, _)| self.view.is_image_layer(*layer))
                        .ok_or_else(|| PatchFailure::Failed(format!("{guest} vanished")))?;
                    let meta = fs::metadata(lower)?;
                    fs::create_dir(&host)?;
                    set_mode(&host, meta.mode())?;
                    chown_like(&host, &meta);
                }
                (_, Some(Node::Other(..))) => return failed(format!("{guest} is not a directory")),
                (_, None) => {
                    fs::create_dir(&host)?;
                    set_mode(&host, DEFAULT_DIR_MODE)?;
                }
            }
        }
        Ok(host)
    }

    /// Resolves the target of a patch: its parent (symlinks followed) and whether the final
    /// name exists, as a node.
    fn target(
        &self,
        guest: &str,
        follow_last: bool,
    ) -> Result<(Vec<String>, Option<Node>), PatchFailure> {
        check_guest_path(guest).map_err(PatchFailure::Failed)?;
        Ok(self.view.resolve(guest, follow_last)?)
    }

    /// Removes `comps` from the view: the upper's entry goes, and a whiteout hides what the
    /// image has there (even where an upper entry hid it before).
    fn remove_node(&self, comps: &[String]) -> Result<(), PatchFailure> {
        let in_image = self.in_image(comps)?.is_some();
        let parent = self.upper_dir(&comps[..comps.len() - 1])?;
        let host = parent.join(&comps[comps.len() - 1]);
        clear_upper(&host)?;
        if in_image {
            whiteout(&host)?;
        }
        Ok(())
    }

    /// Clears the way for a new entry at `guest`: refuses an existing path unless
    /// `replace`; returns the upper path to create and whether an image directory is there
    /// (a new directory must then be opaque).
    fn make_way(&self, guest: &str, replace: bool) -> Result<(PathBuf, bool), PatchFailure> {
        let (comps, node) = self.target(guest, false)?;
        if node.is_some() && !replace {
            return Err(PatchFailure::Exists);
        }
        // A directory here must hide the image's directory, also one an earlier patch
        // removed.
        let image_dir = matches!(self.in_image(&comps)?, Some(Node::Dir(_)));
        let parent = self.upper_dir(&comps[..comps.len() - 1])?;
        let host = parent.join(&comps[comps.len() - 1]);
        clear_upper(&host)?;
        Ok((host, image_dir))
    }

    fn write_file(
        &self,
        guest: &str,
        data: &[u8],
        mode: u32,
        replace: bool,
    ) -> Result<(), PatchFailure> {
        let (host, _) = self.make_way(guest, replace)?;
        fs::write(&host, data)?;
        set_mode(&host, mode)?;
        Ok(())
    }

    /// Applies one patch.
    pub(crate) fn apply(&self, patch: &Patch) -> Result<(), PatchFailure> {
        match patch {
            Patch::Text {
                path,
                content,
                mode,
                replace,
            } => self.write_file(
                path,
                content.as_bytes(),
                mode.unwrap_or(DEFAULT_FILE_MODE),
                *replace,
            ),
            Patch::File {
                path,
                content,
                mode,
                replace,
            } => self.write_file(path, content, mode.unwrap_or(DEFAULT_FILE_MODE), *replace),
            Patch::Append { path, content } => self.append(path, content.as_bytes()),
            Patch::Mkdir { path, mode } => self.mkdir(path, mode.unwrap_or(DEFAULT_DIR_MODE)),
            Patch::Remove { path } => {
                let (comps, node) = self.target(path, false)?;
                match node {
                    Some(_) => self.remove_node(&comps),
                    None => Ok(()),
                }
            }
            Patch::Symlink {
                target,
                link,
                replace,
            } => {
                let (host, _) = self.make_way(link, *replace)?;
                std::os::unix::fs::symlink(target, &host)?;
                Ok(())
            }
            Patch::CopyFile {
                src,
                dst,
                mode,
                replace,
            } => {
                let meta = fs::metadata(src)
                    .map_err(|e| PatchFailure::Failed(format!("{}: {e}", src.display())))?;
                if !meta.is_file() {
                    return failed(format!("{} is not a regular file", src.display()));
                }
                let (host, _) = self.make_way(dst, *replace)?;
                fs::copy(src, &host)?;
                set_mode(&host, mode.unwrap_or(meta.mode()))?;
                Ok(())
            }
            Patch::CopyDir { src, dst, replace } => {
                let meta = fs::metadata(src)
                    .map_err(|e| PatchFailure::Failed(format!("{}: {e}", src.display())))?;
                if !meta.is_dir() {
                    return failed(format!("{} is not a directory", src.display()));
                }
                let (host, image_dir) = self.make_way(dst, *replace)?;
                copy_tree(src, &host)?;
                if image_dir {
                    mark_opaque(&host)?;
                }
                Ok(())
            }
        }
    }

    fn mkdir(&self, guest: &str, mode: u32) -> Result<(), PatchFailure> {
        let (comps, node) = self.target(guest, true)?;
        match node {
            Some(Node::Dir(_)) => Ok(()),
            Some(Node::Other(..)) => failed(format!("{guest} exists and is not a directory")),
            None => {
                let host = self.upper_dir(&comps)?;
                set_mode(&host, mode)?;
                Ok(())
            }
        }
    }

    fn append(&self, guest: &str, data: &[u8]) -> Result<(), PatchFailure> {
        let (comps, node) = self.target(guest, true)?;
        let (layer, lower, meta) = match node {
            Some(Node::Other(layer, host, meta)) if meta.is_file() => (layer, host, meta),
            Some(_) => return failed(format!("{guest} is not a regular file")),
            None => return failed(format!("{guest} does not exist")),
        };
        let parent = self.upper_dir(&comps[..comps.len() - 1])?;
        let host = parent.join(&comps[comps.len() - 1]);
        if self.view.is_image_layer(layer) {
            // Copy up: contents, mode, owner.
            fs::copy(&lower, &host)?;
            set_mode(&host, meta.mode())?;
            chown_like(&host, &meta);
        }
        fs::OpenOptions::new()
            .append(true)
            .open(&host)?
            .write_all(data)?;
        Ok(())
    }
}

/// Copies a host tree: directories, regular files (modes kept) and symlinks (as links).
/// `src` itself may be a symlink to a directory; below it nothing is followed.
fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    let meta = fs::metadata(src)?;
    fs::create_dir(dst)?;
    for e in fs::read_dir(src)? {
        let e = e?;
        let (from, to) = (e.path(), dst.join(e.file_name()));
        let ft = e.file_type()?;
        if ft.is_dir() {
            copy_tree(&from, &to)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&from)?, &to)?;
        } else if ft.is_file() {
            fs::copy(&from, &to)?;
        } else {
            tracing::warn!(
                "copy_dir: skipping {} (not a file, directory or link)",
                from.display()
            );
        }
    }
    set_mode(dst, meta.mode())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    struct Fixture {
        _dir: tempfile::TempDir,
        upper: PathBuf,
        lower: PathBuf,
        host: PathBuf,
        patcher: Patcher,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let (upper, lower, host) = (
            dir.path().join("u"),
            dir.path().join("l"),
            dir.path().join("h"),
        );
        for p in [&upper, &lower, &host] {
            fs::create_dir_all(p).expect("mkdir");
        }
        fs::create_dir_all(lower.join("etc/conf.d")).expect("mkdir");
        fs::write(lower.join("etc/hosts"), b"127.0.0.1 localhost\n").expect("write");
        set_mode(&lower.join("etc/hosts"), 0o640).expect("chmod");
        fs::write(lower.join("etc/conf.d/a"), b"a").expect("write");
        std::os::unix::fs::symlink("etc", lower.join("config")).expect("symlink");
        let patcher = Patcher::new(&upper, std::slice::from_ref(&lower));
        Fixture {
            _dir: dir,
            upper,
            lower,
            host,
            patcher,
        }
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).expect("stat").mode() & 0o7777
    }

    #[test]
    fn text_refuses_image_paths_unless_replace() {
        let f = fixture();
        let p = |path: &str, replace| Patch::Text {
            path: path.into(),
            content: "new\n".into(),
            mode: None,
            replace,
        };
        assert!(matches!(
            f.patcher.apply(&p("/etc/hosts", false)),
            Err(PatchFailure::Exists)
        ));
        f.patcher.apply(&p("/etc/hosts", true)).expect("replace");
        assert_eq!(fs::read(f.upper.join("etc/hosts")).expect("read"), b"new\n");
        // The copied-up parent keeps the image's mode; the image is untouched.
        assert_eq!(
            fs::read(f.lower.join("etc/hosts")).expect("read"),
            b"127.0.0.1 localhost\n"
        );
        // A new file in a new directory, through the image's symlink /config -> etc.
        f.patcher
            .apply(&Patch::Text {
                path: "/config/new/x".into(),
                content: "x".into(),
                mode: Some(0o600),
                replace: false,
            })
            .expect("new file");
        assert_eq!(mode(&f.upper.join("etc/new/x")), 0o600);
        // Written by an earlier patch counts as existing too.
        assert!(matches!(
            f.patcher.apply(&Patch::Text {
                path: "/etc/new/x".into(),
                content: "y".into(),
                mode: None,
                replace: false
            }),
            Err(PatchFailure::Exists)
        ));
    }

    #[test]
    fn append_copies_up_and_keeps_the_mode() {
        let f = fixture();
        f.patcher
            .apply(&Patch::Append {
                path: "/etc/hosts".into(),
                content: "10.0.0.1 app\n".into(),
            })
            .expect("append");
        assert_eq!(
            fs::read_to_string(f.upper.join("etc/hosts")).expect("read"),
            "127.0.0.1 localhost\n10.0.0.1 app\n"
        );
        assert_eq!(mode(&f.upper.join("etc/hosts")), 0o640);
        assert!(f
            .patcher
            .apply(&Patch::Append {
                path: "/etc/missing".into(),
                content: "x".into()
            })
            .is_err());
    }

    #[test]
    fn remove_and_mkdir_are_idempotent() {
        let f = fixture();
        let rm = |p: &str| Patch::Remove { path: p.into() };
        f.patcher.apply(&rm("/etc/conf.d")).expect("remove");
        f.patcher.apply(&rm("/etc/conf.d")).expect("again");
        f.patcher.apply(&rm("/nothing/here")).expect("missing");
        let wo = fs::symlink_metadata(f.upper.join("etc/conf.d")).expect("whiteout");
        assert!(wo.file_type().is_char_device());
        // mkdir over the removed image directory: a fresh, opaque directory.
        let mk = |p: &str| Patch::Mkdir {
            path: p.into(),
            mode: Some(0o700),
        };
        f.patcher.apply(&mk("/etc/conf.d")).expect("mkdir");
        f.patcher.apply(&mk("/etc/conf.d")).expect("again");
        f.patcher.apply(&mk("/etc")).expect("an image directory");
        assert!(fs::symlink_metadata(f.upper.join("etc/conf.d"))
            .expect("dir")
            .is_dir());
        assert!(super::super::view::is_opaque(&f.upper.join("etc/conf.d")));
        assert_eq!(mode(&f.upper.join("etc/conf.d")), 0o700);
        assert!(
            f.patcher.apply(&mk("/etc/hosts")).is_err(),
            "a file is in the way"
        );
        // A file only in the upper is simply deleted.
        f.patcher
            .apply(&Patch::Text {
                path: "/tmpfile".into(),
                content: "t".into(),
                mode: None,
                replace: false,
            })
            .expect("text");
        f.patcher.apply(&rm("/tmpfile")).expect("remove");
        assert!(fs::symlink_metadata(f.upper.join("tmpfile")).is_err());
    }

    #[test]
    fn symlink_and_copies() {
        let f = fixture();
        f.patcher
            .apply(&Patch::Symlink {
                target: "/etc/hosts".into(),
                link: "/hosts".into(),
                replace: false,
            })
            .expect("symlink");
        assert_eq!(
            fs::read_link(f.upper.join("hosts")).expect("link"),
            Path::new("/etc/hosts")
        );
        assert!(matches!(
            f.patcher.apply(&Patch::Symlink {
                target: "x".into(),
                link: "/config".into(),
                replace: false
            }),
            Err(PatchFailure::Exists)
        ));

        fs::write(f.host.join("tool"), b"#!/bin/sh\n").expect("write");
        set_mode(&f.host.join("tool"), 0o751).expect("chmod");
        f.patcher
            .apply(&Patch::CopyFile {
                src: f.host.join("tool"),
                dst: "/usr/local/bin/tool".into(),
                mode: None,
                replace: false,
            })
            .expect("copy_file");
        assert_eq!(mode(&f.upper.join("usr/local/bin/tool")), 0o751);

        let tree = f.host.join("tree");
        fs::create_dir_all(tree.join("sub")).expect("mkdir");
        fs::write(tree.join("sub/f"), b"f").expect("write");
        std::os::unix::fs::symlink("/etc/shadow", tree.join("link")).expect("symlink");
        assert!(matches!(
            f.patcher.apply(&Patch::CopyDir {
                src: tree.clone(),
                dst: "/etc/conf.d".into(),
                replace: false
            }),
            Err(PatchFailure::Exists)
        ));
        f.patcher
            .apply(&Patch::CopyDir {
                src: tree,
                dst: "/etc/conf.d".into(),
                replace: true,
            })
            .expect("copy_dir");
        let d = f.upper.join("etc/conf.d");
        assert_eq!(fs::read(d.join("sub/f")).expect("read"), b"f");
        assert_eq!(
            fs::read_link(d.join("link")).expect("link"),
            Path::new("/etc/shadow")
        );
        assert!(
            super::super::view::is_opaque(&d),
            "the image's a must stay hidden"
        );
    }

    #[test]
    fn removing_what_an_earlier_patch_replaced_still_hides_the_image() {
        let f = fixture();
        f.patcher
            .apply(&Patch::Text {
                path: "/etc/hosts".into(),
                content: "mine\n".into(),
                mode: None,
                replace: true,
            })
            .expect("replace");
        f.patcher
            .apply(&Patch::Remove {
                path: "/etc/hosts".into(),
            })
            .expect("remove");
        let wo = fs::symlink_metadata(f.upper.join("etc/hosts")).expect("whiteout");
        assert!(
            wo.file_type().is_char_device(),
            "the image's hosts stays hidden"
        );
        // remove, mkdir, remove: the image's directory stays hidden.
        for p in [
            Patch::Remove {
                path: "/etc/conf.d".into(),
            },
            Patch::Mkdir {
                path: "/etc/conf.d".into(),
                mode: None,
            },
            Patch::Remove {
                path: "/etc/conf.d".into(),
            },
        ] {
            f.patcher.apply(&p).expect("patch");
        }
        let wo = fs::symlink_metadata(f.upper.join("etc/conf.d")).expect("whiteout");
        assert!(wo.file_type().is_char_device());
        // copy_dir onto the removed directory: opaque, so the image's files stay gone.
        let tree = f.host.join("t");
        fs::create_dir_all(&tree).expect("mkdir");
        fs::write(tree.join("new"), b"n").expect("write");
        f.patcher
            .apply(&Patch::CopyDir {
                src: tree,
                dst: "/etc/conf.d".into(),
                replace: false,
            })
            .expect("copy_dir");
        assert!(super::super::view::is_opaque(&f.upper.join("etc/conf.d")));
    }

    #[test]
    fn copy_dir_through_a_symlinked_source_keeps_its_mode() {
        let f = fixture();
        let tree = f.host.join("real");
        fs::create_dir_all(&tree).expect("mkdir");
        set_mode(&tree, 0o750).expect("chmod");
        std::os::unix::fs::symlink(&tree, f.host.join("link")).expect("symlink");
        f.patcher
            .apply(&Patch::CopyDir {
                src: f.host.join("link"),
                dst: "/srv".into(),
                replace: false,
            })
            .expect("copy_dir");
        assert_eq!(mode(&f.upper.join("srv")), 0o750);
    }

    #[test]
    fn bad_paths_are_refused() {
        let f = fixture();
        for bad in ["relative", "/", "/a/../b", "/a\0b"] {
            let r = f.patcher.apply(&Patch::Mkdir {
                path: bad.into(),
                mode: None,
            });
            assert!(matches!(r, Err(PatchFailure::Failed(_))), "{bad:?}");
        }
    }
}
