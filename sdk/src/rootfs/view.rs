//! The guest's view of a root filesystem, computed on the host: the writable upper
//! directory over read-only layers, merged as overlayfs merges them. Patches use it to
//! tell whether a path exists "in the image" and to find what to copy up.
//!
//! overlayfs rules followed here: a name is looked up from the top layer down; a whiteout
//! (a character device 0:0) hides the name in every layer below; a non-directory hides
//! everything below it; directories merge, unless one is opaque (xattr
//! `user.overlay.opaque` = `y`, as the guest mounts with `userxattr`), which hides the
//! layers below it. Symlinks on the way are resolved inside the view, with `/` being the
//! guest's root, never the host's.

use std::fs::Metadata;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The xattr marking an opaque directory (overlayfs with `userxattr`).
pub(crate) const OPAQUE_XATTR: &str = "user.overlay.opaque";
/// Most symlinks followed while resolving one path (Linux's limit).
const MAX_SYMLINKS: usize = 40;

/// True for an overlayfs whiteout.
pub(crate) fn is_whiteout(meta: &Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

/// True when the directory at `path` is marked opaque.
pub(crate) fn is_opaque(path: &Path) -> bool {
    let mut buf = [0u8; 4];
    matches!(rustix::fs::lgetxattr(path, OPAQUE_XATTR, &mut buf), Ok(1) if buf[0] == b'y')
}

/// What a guest path names in the merged view.
#[derive(Debug)]
pub(crate) enum Node {
    /// A directory: the host directories that make it up, top layer first (`0` is the
    /// upper when it has one).
    Dir(Vec<(usize, PathBuf)>),
    /// Anything else: the topmost entry (layer index, host path, metadata).
    Other(usize, PathBuf, Metadata),
}

/// Layer 0 is the writable upper (when there is one); the rest are the image layers, top
/// first.
#[derive(Debug, Clone)]
pub(crate) struct MergedView {
    layers: Vec<PathBuf>,
    first_lower: usize,
}

/// The components of an absolute guest path (`.` and empty ones dropped); `..` is refused
/// by the callers before a path gets here.
pub(crate) fn components(guest: &str) -> Vec<String> {
    guest
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .map(str::to_string)
        .collect()
}

impl MergedView {
    /// The view of `upper` over `lowers` (bottom first, as images list them).
    pub(crate) fn new(upper: &Path, lowers: &[PathBuf]) -> Self {
        let mut layers = vec![upper.to_path_buf()];
        layers.extend(lowers.iter().rev().cloned());
        MergedView {
            layers,
            first_lower: 1,
        }
    }

    /// The image alone, without the upper: what "exists in the image" means.
    pub(crate) fn image(lowers: &[PathBuf]) -> Self {
        MergedView {
            layers: lowers.iter().rev().cloned().collect(),
            first_lower: 0,
        }
    }

    /// True when layer `i` is an image layer (not the upper).
    pub(crate) fn is_image_layer(&self, i: usize) -> bool {
        i >= self.first_lower
    }

    fn root(&self) -> Node {
        Node::Dir(self.layers.iter().cloned().enumerate().collect())
    }

    /// The child `name` of a merged directory.
    fn child(dir: &[(usize, PathBuf)], name: &str) -> io::Result<Option<Node>> {
        let mut parts: Vec<(usize, PathBuf)> = Vec::new();
        for (layer, host_dir) in dir {
            let p = host_dir.join(name);
            let meta = match std::fs::symlink_metadata(&p) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => continue,
                Err(e) => return Err(e),
            };
            if is_whiteout(&meta) {
                break;
            }
            if !meta.is_dir() {
                if parts.is_empty() {
                    return Ok(Some(Node::Other(*layer, p, meta)));
                }
                // A non-directory below a directory is hidden by it.
                break;
            }
            let opaque = is_opaque(&p);
            parts.push((*layer, p));
            if opaque {
                break;
            }
        }
        Ok((!parts.is_empty()).then_some(Node::Dir(parts)))
    }

    /// Resolves `guest` (absolute) to the guest path it names after following the symlinks
    /// on the way; the last component is followed too when `follow_last`. Returns the
    /// resolved components and the node, or `None` when the path does not exist (the
    /// components are then those of the missing path, with its parent resolved).
    pub(crate) fn resolve(
        &self,
        guest: &str,
        follow_last: bool,
    ) -> io::Result<(Vec<String>, Option<Node>)> {
        let mut todo: Vec<String> = components(guest);
        todo.reverse();
        let mut done: Vec<String> = Vec::new();
        let mut node = self.root();
        let mut hops = 0;
        while let Some(name) = todo.pop() {
            if name == ".." {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "'..' in a guest path",
                ));
            }
            let Node::Dir(dir) = &node else {
                return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
            };
            let Some(child) = Self::child(dir, &name)? else {
                done.push(name);
                if !todo.is_empty() {
                    // A missing parent: report the whole path as missing.
                    todo.reverse();
                    done.extend(todo);
                }
                return Ok((done, None));
            };
            let is_last = todo.is_empty();
            if let Node::Other(_, host, meta) = &child {
                if meta.file_type().is_symlink() && (!is_last || follow_last) {
                    hops += 1;
                    if hops > MAX_SYMLINKS {
                        return Err(io::Error::from_raw_os_error(libc::ELOOP));
                    }
                    let target = std::fs::read_link(host)?;
                    let target = target.to_string_lossy();
                    if target.starts_with('/') {
                        done.clear();
                    }
                    let mut next: Vec<String> = Vec::new();
                    for c in target.split('/').filter(|c| !c.is_empty() && *c != ".") {
                        if c == ".." {
                            // Resolve `..` lexically against what is done: the root's
                            // parent is the root, as in the guest.
                            if next.pop().is_none() {
                                done.pop();
                            }
                        } else {
                            next.push(c.to_string());
                        }
                    }
                    // Restart from the directory the link lives in (or the root).
                    let base = done.clone();
                    node = self.root();
                    done.clear();
                    let mut rest: Vec<String> = base;
                    rest.extend(next);
                    todo.extend(rest.into_iter().rev());
                    continue;
                }
            }
            done.push(name);
            node = child;
        }
        Ok((done, Some(node)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn setup() -> (tempfile::TempDir, MergedView) {
        let d = tempfile::tempdir().expect("tempdir");
        let (upper, low, high) = (d.path().join("u"), d.path().join("l0"), d.path().join("l1"));
        for p in [&upper, &low, &high] {
            std::fs::create_dir_all(p).expect("mkdir");
        }
        std::fs::create_dir_all(low.join("usr/bin")).expect("mkdir");
        std::fs::write(low.join("usr/bin/tool"), b"x").expect("write");
        symlink("usr/bin", low.join("bin")).expect("symlink");
        std::fs::create_dir_all(low.join("etc")).expect("mkdir");
        std::fs::write(low.join("etc/gone"), b"x").expect("write");
        std::fs::write(low.join("etc/kept"), b"x").expect("write");
        std::fs::create_dir_all(high.join("etc")).expect("mkdir");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            high.join("etc/gone"),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::empty(),
            0,
        )
        .expect("whiteout");
        symlink("/usr/bin/tool", high.join("abs")).expect("symlink");
        let view = MergedView::new(&upper, &[low, high]);
        (d, view)
    }

    fn exists(v: &MergedView, p: &str) -> bool {
        v.resolve(p, false).expect("resolves").1.is_some()
    }

    #[test]
    fn layers_merge_with_whiteouts_and_symlinks() {
        let (_d, v) = setup();
        assert!(exists(&v, "/etc/kept"));
        assert!(!exists(&v, "/etc/gone"), "whited out in the top layer");
        assert!(exists(&v, "/bin/tool"), "through a relative symlink");
        let (comps, node) = v.resolve("/bin/tool", false).expect("resolves");
        assert_eq!(comps, ["usr", "bin", "tool"]);
        assert!(matches!(node, Some(Node::Other(2, _, _))));
        let (comps, _) = v.resolve("/abs", true).expect("resolves");
        assert_eq!(comps, ["usr", "bin", "tool"]);
        let (comps, node) = v.resolve("/bin/new/file", false).expect("resolves");
        assert_eq!(comps, ["usr", "bin", "new", "file"]);
        assert!(node.is_none());
        assert!(matches!(v.resolve("/", false), Ok((c, Some(Node::Dir(_)))) if c.is_empty()));
    }

    #[test]
    fn symlink_loops_end() {
        let (d, v) = setup();
        symlink("/loop", d.path().join("u/loop")).expect("symlink");
        let e = v.resolve("/loop/x", false).expect_err("a loop");
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
    }

    #[test]
    fn dotdot_in_links_stays_inside() {
        let (d, v) = setup();
        symlink("../../../../etc/kept", d.path().join("u/up")).expect("symlink");
        let (comps, node) = v.resolve("/up", true).expect("resolves");
        assert_eq!(comps, ["etc", "kept"]);
        assert!(node.is_some());
    }
}
