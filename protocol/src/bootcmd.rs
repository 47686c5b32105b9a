//! Settings the VMM passes to the agent on the kernel command line. The kernel ignores
//! parameters with a dot for init's environment, so the agent reads them from
//! `/proc/cmdline`. Commands themselves travel over vsock ([`crate::message`]).
//!
//! The root filesystem and the volumes are announced here too: `msb.root=N` says the
//! virtio-fs tag [`ROOT_TAG`] holds `N` read-only layers at `/l/0` (bottom) to `/l/N-1`
//! (top) and the writable layer at `/rw/upper` with overlayfs' work directory at
//! `/rw/work`; each `msb.mnt=` word is one [`GuestMount`].

/// Kernel command-line key carrying the hostname.
pub const HOSTNAME_KEY: &str = "msb.hostname";
/// Kernel command-line key carrying the number of read-only root layers.
pub const ROOT_KEY: &str = "msb.root";
/// The virtio-fs tag of the root filesystem device.
pub const ROOT_TAG: &str = "msbroot";
/// Kernel command-line key of one volume mount (repeated).
pub const MOUNT_KEY: &str = "msb.mnt";
/// Kernel command-line key of the security profile of user commands: with
/// [`SECURITY_RESTRICTED`], every command runs with `no_new_privs` set and without
/// `CAP_SYS_ADMIN` in its bounding set (so it cannot mount, even as root). Volumes are
/// mounted `nosuid,nodev` whatever the profile.
pub const SECURITY_KEY: &str = "msb.security";
/// The value of [`SECURITY_KEY`] for the restricted profile.
pub const SECURITY_RESTRICTED: &str = "restricted";

/// Finds `key=value` in a kernel command line and returns the value.
pub fn find_param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .find_map(|p| p.strip_prefix(key)?.strip_prefix('='))
}

/// Every value of `key=value` in a kernel command line, in order.
pub fn find_all<'a>(cmdline: &'a str, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    cmdline
        .split_ascii_whitespace()
        .filter_map(move |p| p.strip_prefix(key)?.strip_prefix('='))
}

/// One mount the agent makes in the guest after switching to the root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestMount {
    /// A virtio-fs device (a host directory) at `path`.
    Virtiofs {
        /// The device's tag.
        tag: String,
        /// Absolute guest path.
        path: String,
        /// Mounted read-only (the device enforces it too).
        readonly: bool,
    },
    /// A tmpfs at `path`, limited to `size_mib` (the kernel's default, half of RAM, when
    /// `None`).
    Tmpfs {
        /// Absolute guest path.
        path: String,
        /// Size limit in MiB.
        size_mib: Option<u32>,
        /// Mounted read-only.
        readonly: bool,
    },
}

impl GuestMount {
    /// The guest path.
    pub fn path(&self) -> &str {
        match self {
            GuestMount::Virtiofs { path, .. } | GuestMount::Tmpfs { path, .. } => path,
        }
    }

    /// The value of a `msb.mnt=` word: `virtiofs,TAG,PATH,ro|rw` or
    /// `tmpfs,SIZE|-,PATH,ro|rw`, with the path percent-encoded so any path fits one word.
    pub fn encode(&self) -> String {
        let rw = |ro: bool| if ro { "ro" } else { "rw" };
        match self {
            GuestMount::Virtiofs {
                tag,
                path,
                readonly,
            } => format!(
                "virtiofs,{},{},{}",
                encode_component(tag),
                encode_component(path),
                rw(*readonly)
            ),
            GuestMount::Tmpfs {
                path,
                size_mib,
                readonly,
            } => format!(
                "tmpfs,{},{},{}",
                size_mib.map_or_else(|| "-".to_string(), |s| s.to_string()),
                encode_component(path),
                rw(*readonly)
            ),
        }
    }

    /// Parses [`GuestMount::encode`]'s output; `None` for anything else.
    pub fn decode(value: &str) -> Option<GuestMount> {
        let parts: Vec<&str> = value.split(',').collect();
        let [kind, arg, path, mode] = parts.as_slice() else {
            return None;
        };
        let readonly = match *mode {
            "ro" => true,
            "rw" => false,
            _ => return None,
        };
        let path = decode_component(path)?;
        match *kind {
            "virtiofs" => Some(GuestMount::Virtiofs {
                tag: decode_component(arg)?,
                path,
                readonly,
            }),
            "tmpfs" => Some(GuestMount::Tmpfs {
                path,
                size_mib: match *arg {
                    "-" => None,
                    s => Some(s.parse().ok()?),
                },
                readonly,
            }),
            _ => None,
        }
    }
}

fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-')
}

/// Percent-encodes every byte but letters, digits and `/._-`.
pub fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if plain(b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Reverses [`encode_component`]; `None` for a malformed escape or non-UTF-8 result.
pub fn decode_component(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_param_needs_exact_key() {
        let line = "quiet msb.hostnamex=1 msb.hostname=box";
        assert_eq!(find_param(line, HOSTNAME_KEY), Some("box"));
        assert_eq!(find_param("quiet", HOSTNAME_KEY), None);
    }

    #[test]
    fn mounts_round_trip_any_path() {
        let mounts = [
            GuestMount::Virtiofs {
                tag: "msbvol0".into(),
                path: "/data dir/ü,x%".into(),
                readonly: true,
            },
            GuestMount::Tmpfs {
                path: "/tmp".into(),
                size_mib: Some(16),
                readonly: false,
            },
            GuestMount::Tmpfs {
                path: "/scratch".into(),
                size_mib: None,
                readonly: true,
            },
        ];
        let line: Vec<String> = mounts
            .iter()
            .map(|m| format!("{MOUNT_KEY}={}", m.encode()))
            .collect();
        let line = format!("quiet {} msb.root=2", line.join(" "));
        assert!(!line.contains("dir/ü"), "{line}");
        let back: Vec<GuestMount> = find_all(&line, MOUNT_KEY)
            .map(|v| GuestMount::decode(v).expect("decodes"))
            .collect();
        assert_eq!(back, mounts);
        assert_eq!(find_param(&line, ROOT_KEY), Some("2"));
    }

    #[test]
    fn malformed_mounts_are_refused() {
        for bad in [
            "",
            "virtiofs,t,/x",
            "virtiofs,t,/x,maybe",
            "nfs,t,/x,rw",
            "tmpfs,big,/x,rw",
            "tmpfs,1,/x%zz,rw",
            "tmpfs,1,/x%,rw",
            "tmpfs,1,%FF,rw",
        ] {
            assert_eq!(GuestMount::decode(bad), None, "{bad}");
        }
    }
}
