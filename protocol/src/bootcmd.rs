//! Settings the VMM passes to the agent on the kernel command line. The kernel ignores
//! parameters with a dot for init's environment, so the agent reads them from
//! `/proc/cmdline`. Commands themselves travel over vsock ([`crate::message`]).
//!
//! The root filesystem and the volumes are announced here too: `msb.root=N` says the
//! virtio-fs tag [`ROOT_TAG`] holds `N` read-only layers at `/l/0` (bottom) to `/l/N-1`
//! (top) and the writable layer at `/rw/upper` with overlayfs' work directory at
//! `/rw/work`; each `msb.mnt=` word is one [`GuestMount`].

/// glibc tunables that keep guest user space off AVX and AVX-512 where the guest kernel
/// runs with `noxsave` (see "User-space AVX on PVM hosts" in `docs/design.md`). The VMM
/// puts `GLIBC_TUNABLES=<this>` on such a kernel command line (a word without a dot in
/// its name, so the kernel hands it to init's environment) and the agent passes it to
/// every command.
pub const NO_AVX_TUNABLES: &str = "glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-AVX_Fast_Unaligned_Load";
/// The environment variable glibc reads its tunables from.
pub const TUNABLES_ENV: &str = "GLIBC_TUNABLES";

/// Kernel command-line key carrying the hostname.
pub const HOSTNAME_KEY: &str = "msb.hostname";
/// Kernel command-line key carrying the number of read-only root layers.
pub const ROOT_KEY: &str = "msb.root";
/// The virtio-fs tag of the root filesystem device.
pub const ROOT_TAG: &str = "msbroot";
/// The virtio-fs tag of the agent's directory (the guest kernel's own root when the VMM
/// boots without an initramfs: `root=msbinit rootfstype=virtiofs init=/init`).
pub const INIT_TAG: &str = "msbinit";
/// Kernel command-line key of one volume mount (repeated).
pub const MOUNT_KEY: &str = "msb.mnt";
/// Kernel command-line key of the security profile of user commands: with
/// [`SECURITY_RESTRICTED`], every command runs with `no_new_privs` set and without
/// `CAP_SYS_ADMIN` in its bounding set, under a seccomp filter that refuses new user
/// namespaces (so it cannot mount, even as root). Volumes are mounted `nosuid,nodev` whatever the profile.
pub const SECURITY_KEY: &str = "msb.security";
/// The value of [`SECURITY_KEY`] for the restricted profile.
pub const SECURITY_RESTRICTED: &str = "restricted";

/// Kernel command-line key of the init hand-off: `auto` or the percent-encoded path of
/// the init, then its arguments, comma-separated (see [`InitSpec`]).
pub const INIT_KEY: &str = "msb.init";
/// Kernel command-line key of one environment variable of the init (`KEY,VALUE`, both
/// percent-encoded; repeated).
pub const INIT_ENV_KEY: &str = "msb.init.env";
/// Where `auto` looks for an init, in order.
pub const INIT_CANDIDATES: &[&str] = &[
    "/sbin/init",
    "/usr/sbin/init",
    "/lib/systemd/systemd",
    "/usr/lib/systemd/systemd",
];

/// A hand-off of PID 1: once the agent has set the guest up, PID 1 becomes this init and
/// the agent carries on as its child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitSpec {
    /// The init's path; `None`: the first of [`INIT_CANDIDATES`] the root has.
    pub path: Option<String>,
    /// Its arguments (after argv\[0\]).
    pub args: Vec<String>,
    /// Its environment (on top of `PATH`).
    pub env: Vec<(String, String)>,
}

impl InitSpec {
    /// The kernel command-line words that carry it.
    pub fn encode(&self) -> Vec<String> {
        let mut head = vec![match &self.path {
            Some(p) => encode_component(p),
            None => "auto".to_string(),
        }];
        head.extend(self.args.iter().map(|a| encode_component(a)));
        let mut words = vec![format!("{INIT_KEY}={}", head.join(","))];
        for (k, v) in &self.env {
            words.push(format!(
                "{INIT_ENV_KEY}={},{}",
                encode_component(k),
                encode_component(v)
            ));
        }
        words
    }

    /// The hand-off a kernel command line asks for, if any; `Err` for a malformed one.
    pub fn from_cmdline(cmdline: &str) -> Result<Option<InitSpec>, String> {
        let Some(value) = find_param(cmdline, INIT_KEY) else {
            return Ok(None);
        };
        let bad = || format!("malformed {INIT_KEY}={value}");
        let mut parts = value.split(',');
        let path = match parts.next() {
            Some("auto") => None,
            Some(p) if !p.is_empty() => Some(decode_component(p).ok_or_else(bad)?),
            _ => return Err(bad()),
        };
        let args = parts
            .map(|a| decode_component(a).ok_or_else(bad))
            .collect::<Result<Vec<_>, _>>()?;
        let mut env = Vec::new();
        for e in find_all(cmdline, INIT_ENV_KEY) {
            let (k, v) = e
                .split_once(',')
                .and_then(|(k, v)| Some((decode_component(k)?, decode_component(v)?)))
                .ok_or_else(|| format!("malformed {INIT_ENV_KEY}={e}"))?;
            env.push((k, v));
        }
        Ok(Some(InitSpec { path, args, env }))
    }
}

/// Finds `key=value` in a kernel command line and returns the value.
pub fn find_param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .find_map(|p| p.strip_prefix(key)?.strip_prefix('='))
}

/// Kernel command-line key listing the RAM the guest adds after boot (memory the e820 map
/// left out, so the kernel does not initialise it while it boots): comma-separated runs
/// `START+COUNT`, a hex guest-physical address and a number of [`HOTMEM_BLOCK`] blocks.
pub const HOTMEM_KEY: &str = "msb.hotmem";
/// Size of one block of [`HOTMEM_KEY`] (Linux's x86_64 memory block, the unit of its
/// memory hotplug).
pub const HOTMEM_BLOCK: u64 = 128 << 20;
/// Most blocks one command line may announce (1 TiB).
pub const HOTMEM_MAX_BLOCKS: u64 = 8192;

/// The [`HOTMEM_KEY`] value for blocks at `starts` (ascending, block aligned), or `None`
/// for no blocks.
pub fn encode_hotmem(starts: &[u64]) -> Option<String> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &s in starts {
        match runs.last_mut() {
            Some((start, n)) if *start + *n * HOTMEM_BLOCK == s => *n += 1,
            _ => runs.push((s, 1)),
        }
    }
    (!runs.is_empty()).then(|| {
        runs.iter()
            .map(|(s, n)| format!("{s:#x}+{n}"))
            .collect::<Vec<_>>()
            .join(",")
    })
}

/// The block start addresses a [`HOTMEM_KEY`] value lists; `None` when it is malformed
/// (not block aligned, overflowing, or more than [`HOTMEM_MAX_BLOCKS`] blocks).
pub fn decode_hotmem(value: &str) -> Option<Vec<u64>> {
    let mut out = Vec::new();
    for run in value.split(',') {
        let (start, count) = run.split_once('+')?;
        let start = u64::from_str_radix(start.strip_prefix("0x")?, 16).ok()?;
        let count: u64 = count.parse().ok()?;
        let total = (out.len() as u64).checked_add(count)?;
        if start % HOTMEM_BLOCK != 0 || total > HOTMEM_MAX_BLOCKS {
            return None;
        }
        for i in 0..count {
            out.push(start.checked_add(i.checked_mul(HOTMEM_BLOCK)?)?);
        }
        start.checked_add(count.checked_mul(HOTMEM_BLOCK)?)?;
    }
    Some(out)
}

/// Kernel command-line key of the guest's network link (absent: no network device):
/// `ADDRESS/PREFIX,GATEWAY,MTU` (see [`GuestNet`]).
pub const NET_KEY: &str = "msb.net";

/// The guest side of the network link: the agent gives `eth0` this address and MTU, a
/// default route through the gateway, and the gateway as its nameserver and as
/// `host.microsandbox.internal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestNet {
    /// The guest's address.
    pub address: std::net::Ipv4Addr,
    /// The link's prefix length.
    pub prefix: u8,
    /// The gateway.
    pub gateway: std::net::Ipv4Addr,
    /// The link's MTU.
    pub mtu: u16,
}

impl GuestNet {
    /// The kernel command-line word.
    pub fn encode(&self) -> String {
        format!(
            "{NET_KEY}={}/{},{},{}",
            self.address, self.prefix, self.gateway, self.mtu
        )
    }

    /// Reads the value of [`NET_KEY`]; `None` when malformed.
    pub fn decode(value: &str) -> Option<GuestNet> {
        let mut parts = value.split(',');
        let (address, prefix) = parts.next()?.split_once('/')?;
        let net = GuestNet {
            address: address.parse().ok()?,
            prefix: prefix.parse().ok().filter(|p| *p <= 32)?,
            gateway: parts.next()?.parse().ok()?,
            mtu: parts.next()?.parse().ok().filter(|m| *m >= 68)?,
        };
        parts.next().is_none().then_some(net)
    }
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
    /// A virtio-blk disk (found by its serial) at `path`.
    Disk {
        /// The disk's serial (`/sys/block/vdX/serial` in the guest).
        serial: String,
        /// Its filesystem (`None`: the agent reads it off the disk).
        fstype: Option<String>,
        /// Absolute guest path.
        path: String,
        /// Mounted read-only (the device refuses writes too).
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
            GuestMount::Virtiofs { path, .. }
            | GuestMount::Disk { path, .. }
            | GuestMount::Tmpfs { path, .. } => path,
        }
    }

    /// The value of a `msb.mnt=` word: `virtiofs,TAG,PATH,ro|rw`,
    /// `disk,SERIAL[:FSTYPE],PATH,ro|rw` or `tmpfs,SIZE|-,PATH,ro|rw`, with the path
    /// percent-encoded so any path fits one word.
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
            GuestMount::Disk {
                serial,
                fstype,
                path,
                readonly,
            } => format!(
                "disk,{}{},{},{}",
                encode_component(serial),
                fstype
                    .as_deref()
                    .map_or_else(String::new, |f| format!(":{}", encode_component(f))),
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
            "disk" => {
                let (serial, fstype) = match arg.split_once(':') {
                    Some((s, f)) => (s, Some(decode_fstype(f)?)),
                    None => (*arg, None),
                };
                Some(GuestMount::Disk {
                    serial: decode_component(serial)?,
                    fstype,
                    path,
                    readonly,
                })
            }
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

/// A filesystem type as the command line carries it: lowercase letters and digits, at most
/// 16 of them (`ext4`, `xfs`, `vfat`).
pub fn valid_fstype(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 16
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

fn decode_fstype(s: &str) -> Option<String> {
    valid_fstype(s).then(|| s.to_string())
}

/// Kernel command-line key of a disk root: `SERIAL,FSTYPE|auto,ro|rw` (see [`DiskRoot`]).
/// With it the root is that virtio-blk disk, mounted as it is (no overlay, no layers).
pub const ROOT_DISK_KEY: &str = "msb.rootdisk";
/// The serial of the root disk.
pub const ROOT_DISK_SERIAL: &str = "msb-root";

/// A root filesystem on a virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRoot {
    /// The disk's serial.
    pub serial: String,
    /// Its filesystem (`None`: read off the disk).
    pub fstype: Option<String>,
    /// Mounted read-only.
    pub readonly: bool,
}

impl DiskRoot {
    /// The kernel command-line word.
    pub fn encode(&self) -> String {
        format!(
            "{ROOT_DISK_KEY}={},{},{}",
            encode_component(&self.serial),
            self.fstype.as_deref().unwrap_or("auto"),
            if self.readonly { "ro" } else { "rw" }
        )
    }

    /// Reads the value of [`ROOT_DISK_KEY`]; `None` when malformed.
    pub fn decode(value: &str) -> Option<DiskRoot> {
        let parts: Vec<&str> = value.split(',').collect();
        let [serial, fstype, mode] = parts.as_slice() else {
            return None;
        };
        Some(DiskRoot {
            serial: decode_component(serial)?,
            fstype: match *fstype {
                "auto" => None,
                f => Some(decode_fstype(f)?),
            },
            readonly: match *mode {
                "ro" => true,
                "rw" => false,
                _ => return None,
            },
        })
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
    #[test]
    fn hotmem_runs_round_trip() {
        const B: u64 = HOTMEM_BLOCK;
        let blocks = vec![B, 2 * B, 3 * B, 40 * B, 41 * B];
        let v = encode_hotmem(&blocks).expect("blocks");
        assert_eq!(v, "0x8000000+3,0x140000000+2");
        assert_eq!(decode_hotmem(&v), Some(blocks));
        assert_eq!(encode_hotmem(&[]), None);
    }

    #[test]
    fn hostile_hotmem_values_are_refused() {
        for v in [
            "",
            "0x8000000",
            "8000000+1",
            "0x8000001+1",
            "0x8000000+x",
            "0x8000000+9000",
            "0xfffffffff8000000+2",
            "0x8000000+1,",
            "0x8000000+1,0x10000000+18446744073709551615",
        ] {
            assert_eq!(decode_hotmem(v), None, "{v}");
        }
    }

    use super::*;

    #[test]
    fn init_specs_round_trip() {
        let spec = InitSpec {
            path: Some("/usr/lib/systemd/systemd".into()),
            args: vec!["--log-level=info".into(), "a b,c".into()],
            env: vec![("container".into(), "msb, yes".into())],
        };
        let line = format!("quiet {} msb.root=1", spec.encode().join(" "));
        assert_eq!(InitSpec::from_cmdline(&line), Ok(Some(spec)));
        let auto = InitSpec {
            path: None,
            args: vec![],
            env: vec![],
        };
        assert_eq!(
            InitSpec::from_cmdline(&auto.encode().join(" ")),
            Ok(Some(auto))
        );
        assert_eq!(InitSpec::from_cmdline("quiet"), Ok(None));
        assert!(InitSpec::from_cmdline("msb.init=").is_err());
        assert!(InitSpec::from_cmdline("msb.init=/x,%zz").is_err());
        assert!(InitSpec::from_cmdline("msb.init=auto msb.init.env=novalue").is_err());
    }

    #[test]
    fn disk_mounts_and_roots_round_trip() {
        for m in [
            GuestMount::Disk {
                serial: "msb-disk-0".into(),
                fstype: None,
                path: "/data dir".into(),
                readonly: false,
            },
            GuestMount::Disk {
                serial: "msb-disk-1".into(),
                fstype: Some("xfs".into()),
                path: "/d".into(),
                readonly: true,
            },
        ] {
            assert_eq!(GuestMount::decode(&m.encode()), Some(m));
        }
        assert_eq!(GuestMount::decode("disk,x:EXT4,/d,rw"), None);
        assert_eq!(GuestMount::decode("disk,x:a%2Cb,/d,rw"), None);
        for r in [
            DiskRoot {
                serial: ROOT_DISK_SERIAL.into(),
                fstype: None,
                readonly: false,
            },
            DiskRoot {
                serial: ROOT_DISK_SERIAL.into(),
                fstype: Some("ext4".into()),
                readonly: true,
            },
        ] {
            let word = r.encode();
            let value = find_param(&word, ROOT_DISK_KEY).unwrap_or_default();
            assert_eq!(DiskRoot::decode(value), Some(r));
        }
        assert_eq!(DiskRoot::decode("msb-root,ext4"), None);
        assert_eq!(DiskRoot::decode("msb-root,../x,rw"), None);
        assert!(valid_fstype("ext4") && !valid_fstype("") && !valid_fstype("ext4,ro"));
    }

    #[test]
    fn guest_net_reads_what_it_writes() {
        let n = GuestNet {
            address: std::net::Ipv4Addr::new(10, 200, 200, 2),
            prefix: 30,
            gateway: std::net::Ipv4Addr::new(10, 200, 200, 1),
            mtu: 65520,
        };
        let word = n.encode();
        assert_eq!(word, "msb.net=10.200.200.2/30,10.200.200.1,65520");
        assert_eq!(
            GuestNet::decode(find_param(&word, NET_KEY).expect("the word")),
            Some(n)
        );
        for bad in [
            "",
            "10.0.0.2/30",
            "10.0.0.2/33,10.0.0.1,1500",
            "10.0.0.2/30,x,1500",
            "10.0.0.2/30,10.0.0.1,20",
            "10.0.0.2/30,10.0.0.1,1500,9",
        ] {
            assert_eq!(GuestNet::decode(bad), None, "{bad}");
        }
    }

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
