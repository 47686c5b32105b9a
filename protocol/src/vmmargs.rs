//! The SDK -> `msb-vmm` contract: every option of the VMM's command line as one plain
//! struct. The SDK fills a [`VmmArgs`] in and renders it with [`VmmArgs::to_args`];
//! `msb-vmm` reads its command line into the same struct with clap (feature `clap`, so
//! that only the VMM compiles the parser). A new flag is one field here.

use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

#[cfg(feature = "clap")]
use crate::network::parse_nameserver;
use crate::network::tls::{HostPattern, TlsSettings};
use crate::network::{
    Action, Ipv4Net, NetworkConfig, NetworkPreset, NetworkSyntaxError, PublishedPort, Rule,
};

/// How much of the guest's RAM its kernel gets at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootMemoryArg {
    /// All of it.
    All,
    /// This many MiB; the rest is added in blocks when the guest needs it.
    Mib(u64),
}

impl FromStr for BootMemoryArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "all" => Ok(BootMemoryArg::All),
            n => n
                .parse()
                .map(BootMemoryArg::Mib)
                .map_err(|_| format!("expected a number of MiB or all, got {n:?}")),
        }
    }
}

impl fmt::Display for BootMemoryArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootMemoryArg::All => f.write_str("all"),
            BootMemoryArg::Mib(n) => write!(f, "{n}"),
        }
    }
}

/// The security profile of the guest's commands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Security {
    /// As the image and the user say.
    #[default]
    Default,
    /// Every command with `no_new_privs` and without `CAP_SYS_ADMIN`.
    Restricted,
}

impl Security {
    /// The flag's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Security::Default => "default",
            Security::Restricted => "restricted",
        }
    }
}

impl FromStr for Security {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "default" => Ok(Security::Default),
            "restricted" => Ok(Security::Restricted),
            other => Err(format!(
                "--security takes default or restricted, got {other:?}"
            )),
        }
    }
}

impl fmt::Display for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `--dns`'s value.
#[cfg(feature = "clap")]
fn nameserver(s: &str) -> Result<SocketAddr, String> {
    parse_nameserver(s).map_err(|e| e.0)
}

/// `PATTERN=VALUE` of `--tls-verify-for` and `--tls-upstream-ca-for`.
fn pattern_pair(s: &str) -> Result<(HostPattern, &str), String> {
    let (p, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected PATTERN=VALUE, got {s:?}"))?;
    Ok((p.parse().map_err(|e: NetworkSyntaxError| e.0)?, v))
}

/// `--tls-verify-for`'s value: `PATTERN=on|off`.
#[cfg_attr(not(feature = "clap"), allow(dead_code))]
fn verify_for(s: &str) -> Result<(HostPattern, bool), String> {
    let (p, v) = pattern_pair(s)?;
    match v {
        "on" => Ok((p, true)),
        "off" => Ok((p, false)),
        _ => Err(format!("expected PATTERN=on|off, got {s:?}")),
    }
}

/// `--tls-upstream-ca-for`'s value: `PATTERN=PATH`.
#[cfg_attr(not(feature = "clap"), allow(dead_code))]
fn ca_for(s: &str) -> Result<(HostPattern, PathBuf), String> {
    let (p, v) = pattern_pair(s)?;
    if v.is_empty() {
        return Err(format!("expected PATTERN=PATH, got {s:?}"));
    }
    Ok((p, PathBuf::from(v)))
}

/// `--upper-size`'s value: MiB above 0.
#[cfg(feature = "clap")]
fn upper_mib(s: &str) -> Result<u64, String> {
    s.parse::<u64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("--upper-size needs MiB above 0, got {s:?}"))
}

/// `--memory`'s value.
#[cfg(feature = "clap")]
fn memory_mib(s: &str) -> Result<u64, String> {
    s.parse()
        .map_err(|_| format!("--memory needs a number of MiB, got {s:?}"))
}

/// `--cpus`'s value.
#[cfg(feature = "clap")]
fn cpu_count(s: &str) -> Result<u8, String> {
    let n: u64 = s
        .parse()
        .map_err(|_| format!("--cpus needs a vCPU count, got {s:?}"))?;
    u8::try_from(n).map_err(|_| format!("--cpus {n} is too many"))
}

/// A number of seconds above 0 (`--idle-timeout`, `--max-duration`).
#[cfg(feature = "clap")]
fn limit_secs(flag: &'static str) -> impl Fn(&str) -> Result<u64, String> + Clone {
    move |s: &str| {
        s.parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{flag} needs seconds above 0, got {s:?}"))
    }
}

/// Every option of `msb-vmm`. With no command and a `--control-socket` or
/// `--vsock-socket`, the agent serves exec requests until one asks it to shut down.
/// The two-valued flags (`volumes`, `ro_volumes`, `tmpfs`) hold their values flat, a
/// pair per occurrence (use [`VmmArgs::volume`] and [`VmmArgs::tmpfs`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::Parser))]
#[cfg_attr(
    feature = "clap",
    command(
        name = "msb-vmm",
        version,
        about = "Boots the microsandbox guest (kernel and agent) and runs CMD in it, or serves \
                 exec requests on a control socket.",
        after_help = "Exit status: the command's (128 + N if killed by signal N); 125 when the \
                      VMM itself fails, with the reason on stderr."
    )
)]
pub struct VmmArgs {
    /// Kernel image [default: the kernel flavour for this host, built if missing].
    #[cfg_attr(feature = "clap", arg(long, value_name = "K"))]
    pub kernel: Option<PathBuf>,
    /// Boot with this initramfs instead of the agent directory shared over virtio-fs.
    #[cfg_attr(feature = "clap", arg(long, value_name = "I"))]
    pub initrd: Option<PathBuf>,
    /// Guest memory in MiB [default: 512].
    #[cfg_attr(feature = "clap", arg(long, value_name = "MiB", value_parser = memory_mib))]
    pub memory: Option<u64>,
    /// RAM the guest kernel gets at boot, MiB or `all` [default: 128 MiB on PVM hosts,
    /// all elsewhere]; the rest is added in 128 MiB blocks when the guest needs it.
    #[cfg_attr(feature = "clap", arg(long, value_name = "MiB|all"))]
    pub boot_memory: Option<BootMemoryArg>,
    /// vCPUs [default: 1].
    #[cfg_attr(feature = "clap", arg(long, value_name = "N", value_parser = cpu_count))]
    pub cpus: Option<u8>,
    /// The KVM device [default: /dev/kvm].
    #[cfg_attr(feature = "clap", arg(long, value_name = "P"))]
    pub kvm_path: Option<PathBuf>,
    /// Write the guest's console to FILE.
    #[cfg_attr(feature = "clap", arg(long, value_name = "FILE"))]
    pub serial_log: Option<PathBuf>,
    /// Echo the guest's console to stderr.
    #[cfg_attr(feature = "clap", arg(long))]
    pub console: bool,
    /// Stop the VM after SECS seconds.
    #[cfg_attr(feature = "clap", arg(long, value_name = "SECS"))]
    pub timeout: Option<u64>,
    /// Guest hostname.
    #[cfg_attr(feature = "clap", arg(long, value_name = "H"))]
    pub hostname: Option<String>,
    /// An extra kernel command-line word (repeatable).
    #[cfg_attr(
        feature = "clap",
        arg(long, value_name = "WORD", allow_hyphen_values = true)
    )]
    pub append: Vec<String>,
    /// Write boot timings, memory and device figures as JSON to FILE at exit.
    #[cfg_attr(feature = "clap", arg(long, value_name = "FILE"))]
    pub report: Option<PathBuf>,
    /// Host socket of the guest's vsock device; host clients connect and send
    /// `CONNECT 1024`.
    #[cfg_attr(feature = "clap", arg(long, value_name = "PATH"))]
    pub vsock_socket: Option<PathBuf>,
    /// Serve the host-agent protocol here through a relay (the vsock socket defaults to
    /// this path plus `.vsock`).
    #[cfg_attr(feature = "clap", arg(long, value_name = "PATH"))]
    pub control_socket: Option<PathBuf>,
    /// The relay's tap of every session's output (JSON lines).
    #[cfg_attr(feature = "clap", arg(long, value_name = "FILE"))]
    pub exec_log: Option<PathBuf>,
    /// End the VM when stdin reaches end of file (ties it to the parent holding the pipe).
    #[cfg_attr(feature = "clap", arg(long))]
    pub exit_with_stdin: bool,
    /// A read-only image layer of the root filesystem, bottom first (repeatable;
    /// `--rootfs` is the same) [default: the default root filesystem].
    #[cfg_attr(
        feature = "clap",
        arg(long = "layer", visible_alias = "rootfs", value_name = "DIR")
    )]
    pub layers: Vec<PathBuf>,
    /// The writable layer [default: a temporary directory removed at exit].
    #[cfg_attr(feature = "clap", arg(long, value_name = "DIR"))]
    pub rw: Option<PathBuf>,
    /// The writable layer's size limit in MiB: past it the guest gets `ENOSPC`.
    #[cfg_attr(
        feature = "clap",
        arg(long, value_name = "MiB", value_parser = upper_mib)
    )]
    pub upper_size: Option<u64>,
    /// Share a host directory at a guest path (repeatable).
    #[cfg_attr(
        feature = "clap",
        arg(long = "volume", num_args = 2, value_names = ["GUEST", "HOST"])
    )]
    pub volumes: Vec<OsString>,
    /// Share a host directory read-only (enforced by the device; repeatable).
    #[cfg_attr(
        feature = "clap",
        arg(long = "ro-volume", num_args = 2, value_names = ["GUEST", "HOST"])
    )]
    pub ro_volumes: Vec<OsString>,
    /// A disk image at a guest path (`/`: the root, instead of the layers), with its
    /// format, `ro` or `rw`, and optionally its filesystem (`raw,rw`, `qcow2,ro,ext4`;
    /// the format is never read off the file); the VMM holds a lock on it (repeatable).
    #[cfg_attr(
        feature = "clap",
        arg(long = "disk", num_args = 3, value_names = ["GUEST", "FORMAT,ro|rw[,FSTYPE]", "IMAGE"])
    )]
    pub disks: Vec<OsString>,
    /// Mount a tmpfs of MiB (`-`: the kernel's default size) at a guest path (repeatable).
    #[cfg_attr(
        feature = "clap",
        arg(long = "tmpfs", num_args = 2, value_names = ["GUEST", "MiB|-"])
    )]
    pub tmpfs: Vec<String>,
    /// Hold an exclusive `flock` on FILE for the VMM's life; refuse to start when another
    /// process holds it.
    #[cfg_attr(feature = "clap", arg(long, value_name = "FILE"))]
    pub lock: Option<PathBuf>,
    /// Drain and power off after SECS without a command or request (needs
    /// --control-socket).
    #[cfg_attr(
        feature = "clap",
        arg(long, value_name = "SECS", value_parser = limit_secs("--idle-timeout"))
    )]
    pub idle_timeout: Option<u64>,
    /// Drain and power off SECS after the start (needs --control-socket).
    #[cfg_attr(
        feature = "clap",
        arg(long, value_name = "SECS", value_parser = limit_secs("--max-duration"))
    )]
    pub max_duration: Option<u64>,
    /// Rewrite FILE every second with a JSON metrics snapshot (needs --control-socket).
    #[cfg_attr(feature = "clap", arg(long, value_name = "FILE"))]
    pub metrics: Option<PathBuf>,
    /// Write how the VM ended to FILE at exit.
    #[cfg_attr(feature = "clap", arg(long, value_name = "FILE"))]
    pub exit_record: Option<PathBuf>,
    /// The VMM's own log filter on stderr [default: warn].
    #[cfg_attr(feature = "clap", arg(long, value_name = "LEVEL"))]
    pub log_level: Option<String>,
    /// The security profile of the guest's commands.
    #[cfg_attr(
        feature = "clap",
        arg(long, value_name = "default|restricted", default_value_t = Security::Default)
    )]
    pub security: Security,
    /// For debugging only: `off` runs the VMM's threads without their syscall filters.
    #[cfg_attr(feature = "clap", arg(long, value_name = "on|off"))]
    pub seccomp: Option<String>,
    /// For debugging only: `off` runs the VMM in the host's mount namespace, not in its
    /// jail.
    #[cfg_attr(feature = "clap", arg(long, value_name = "on|off"))]
    pub jail: Option<String>,
    /// Test hook: the named thread kind makes a syscall outside its filter once it runs.
    #[cfg_attr(feature = "clap", arg(long, value_name = "KIND", hide = true))]
    pub test_seccomp_violation: Option<String>,
    /// Hand PID 1 to the image's init (`auto`) or to this guest path once the agent has
    /// set the guest up.
    #[cfg_attr(feature = "clap", arg(long, value_name = "auto|PATH"))]
    pub init: Option<String>,
    /// An argument of the init (repeatable).
    #[cfg_attr(
        feature = "clap",
        arg(long, value_name = "ARG", allow_hyphen_values = true)
    )]
    pub init_arg: Vec<String>,
    /// An environment variable of the init, K=V (repeatable).
    #[cfg_attr(feature = "clap", arg(long, value_name = "K=V"))]
    pub init_env: Vec<String>,
    /// No network device (the guest has only `lo`).
    #[cfg_attr(feature = "clap", arg(long))]
    pub no_net: bool,
    /// The network policy preset: none, public-only (the default), allow-all, or profiles
    /// like public,private,host.
    #[cfg_attr(feature = "clap", arg(long, value_name = "PRESET"))]
    pub net: Option<NetworkPreset>,
    /// A network rule before the preset's, first match wins (repeatable):
    /// `ACTION [egress|ingress|both] [PROTOCOLS] DESTINATION [PORTS]`, e.g.
    /// `allow egress tcp 10.0.5.10 443`.
    #[cfg_attr(feature = "clap", arg(long, value_name = "RULE"))]
    pub net_rule: Vec<Rule>,
    /// What happens to guest connections no rule matches [default: the preset's].
    #[cfg_attr(feature = "clap", arg(long, value_name = "allow|deny"))]
    pub net_default_egress: Option<Action>,
    /// What happens to published-port connections no rule matches [default: the preset's].
    #[cfg_attr(feature = "clap", arg(long, value_name = "allow|deny"))]
    pub net_default_ingress: Option<Action>,
    /// Publish a port: `[BIND:]HOST:GUEST[/udp]`, bound to 127.0.0.1 unless BIND is given
    /// (repeatable).
    #[cfg_attr(feature = "clap", arg(short = 'p', long = "port", value_name = "SPEC"))]
    pub ports: Vec<PublishedPort>,
    /// A nameserver the sandbox's DNS forwards to, IP or IP:PORT, in order (repeatable)
    /// [default: the host's /etc/resolv.conf].
    #[cfg_attr(
        feature = "clap",
        arg(long = "dns", value_name = "ADDR", value_parser = nameserver)
    )]
    pub nameservers: Vec<SocketAddr>,
    /// How long one nameserver gets before the next is asked [default: 5000].
    #[cfg_attr(feature = "clap", arg(long, value_name = "MS"))]
    pub dns_timeout_ms: Option<u64>,
    /// Let DNS answers point public names at private or loopback addresses.
    #[cfg_attr(feature = "clap", arg(long))]
    pub no_dns_rebind_protection: bool,
    /// The guest link, /30 or wider: the gateway is its first address, the guest the
    /// second [default: 10.200.200.0/30].
    #[cfg_attr(feature = "clap", arg(long, value_name = "CIDR"))]
    pub net_subnet: Option<Ipv4Net>,
    /// The guest link's MTU [default: 65520].
    #[cfg_attr(feature = "clap", arg(long, value_name = "BYTES"))]
    pub mtu: Option<u16>,
    /// Most TCP connections plus UDP flows at once [default: 1024].
    #[cfg_attr(feature = "clap", arg(long, value_name = "N"))]
    pub net_max_connections: Option<usize>,
    /// Intercept TLS on the intercepted ports (needs `--tls-ca-cert` and `--tls-ca-key`).
    #[cfg_attr(feature = "clap", arg(long))]
    pub tls: bool,
    /// A destination port whose TCP connections are intercepted (repeatable) [default: 443].
    #[cfg_attr(feature = "clap", arg(long, value_name = "PORT"))]
    pub tls_port: Vec<u16>,
    /// A server name passed through untouched, `name` or `*.domain` (repeatable).
    #[cfg_attr(feature = "clap", arg(long, value_name = "PATTERN"))]
    pub tls_bypass: Vec<HostPattern>,
    /// Do not verify upstream certificates.
    #[cfg_attr(feature = "clap", arg(long))]
    pub tls_no_verify: bool,
    /// Verify upstream certificates of matching names or not, `PATTERN=on|off`
    /// (repeatable, first match wins).
    #[cfg_attr(feature = "clap", arg(long, value_name = "PATTERN=on|off", value_parser = verify_for))]
    pub tls_verify_for: Vec<(HostPattern, bool)>,
    /// Let UDP to the intercepted ports (QUIC) through.
    #[cfg_attr(feature = "clap", arg(long))]
    pub tls_allow_quic: bool,
    /// A PEM file of CA certificates trusted for every upstream, besides the host's roots
    /// (repeatable).
    #[cfg_attr(feature = "clap", arg(long, value_name = "PATH"))]
    pub tls_upstream_ca: Vec<PathBuf>,
    /// CA certificates trusted only for matching names, `PATTERN=PATH` (repeatable).
    #[cfg_attr(feature = "clap", arg(long, value_name = "PATTERN=PATH", value_parser = ca_for))]
    pub tls_upstream_ca_for: Vec<(HostPattern, PathBuf)>,
    /// The interception CA's certificate (PEM).
    #[cfg_attr(feature = "clap", arg(long, value_name = "PATH"))]
    pub tls_ca_cert: Option<PathBuf>,
    /// The interception CA's private key (PEM).
    #[cfg_attr(feature = "clap", arg(long, value_name = "PATH"))]
    pub tls_ca_key: Option<PathBuf>,
    /// The sandbox's secrets (JSON, readable by its owner only); read before the guest
    /// boots.
    #[cfg_attr(feature = "clap", arg(long, value_name = "PATH"))]
    pub secrets_file: Option<PathBuf>,
    /// The command to run in the guest (after the options, with or without `--`).
    #[cfg_attr(feature = "clap", arg(value_name = "CMD", trailing_var_arg = true))]
    pub command: Vec<OsString>,
}

impl VmmArgs {
    /// Adds a shared host directory at `guest`.
    pub fn volume(&mut self, guest: &str, host: impl Into<OsString>, readonly: bool) {
        let list = if readonly {
            &mut self.ro_volumes
        } else {
            &mut self.volumes
        };
        list.extend([OsString::from(guest), host.into()]);
    }

    /// Adds a disk image at `guest` (`/`: the root): `spec` is `FORMAT,ro|rw[,FSTYPE]`.
    pub fn disk(&mut self, guest: &str, spec: &str, image: impl Into<OsString>) {
        self.disks
            .extend([OsString::from(guest), OsString::from(spec), image.into()]);
    }

    /// Adds a tmpfs at `guest` of `size_mib` (`None`: the kernel's default).
    pub fn tmpfs(&mut self, guest: &str, size_mib: Option<u32>) {
        let size = size_mib.map_or_else(|| "-".to_string(), |s| s.to_string());
        self.tmpfs.extend([guest.to_string(), size]);
    }

    /// The network the flags describe (`None`: `--no-net`): the preset's policy (default
    /// public-only) with the `--net-rule`s before its rules and the defaults overridden,
    /// checked.
    pub fn network(&self) -> Result<Option<NetworkConfig>, NetworkSyntaxError> {
        if self.no_net {
            return Ok(None);
        }
        let mut cfg = NetworkConfig::default();
        let base = self
            .net
            .as_ref()
            .map_or_else(Default::default, NetworkPreset::policy);
        cfg.policy.rules = self.net_rule.clone();
        cfg.policy.rules.extend(base.rules);
        cfg.policy.default_egress = self.net_default_egress.unwrap_or(base.default_egress);
        cfg.policy.default_ingress = self.net_default_ingress.unwrap_or(base.default_ingress);
        cfg.ports = self.ports.clone();
        cfg.dns.nameservers = self.nameservers.clone();
        if let Some(t) = self.dns_timeout_ms {
            cfg.dns.query_timeout_ms = t;
        }
        cfg.dns.rebind_protection = !self.no_dns_rebind_protection;
        if let Some(s) = self.net_subnet {
            cfg.subnet = s;
        }
        if let Some(m) = self.mtu {
            cfg.mtu = m;
        }
        if let Some(m) = self.net_max_connections {
            cfg.max_connections = m;
        }
        cfg.tls = TlsSettings {
            enabled: self.tls,
            intercepted_ports: if self.tls_port.is_empty() {
                cfg.tls.intercepted_ports.clone()
            } else {
                self.tls_port.clone()
            },
            bypass: self.tls_bypass.clone(),
            verify_upstream: !self.tls_no_verify,
            verify_upstream_for: self.tls_verify_for.clone(),
            block_quic: !self.tls_allow_quic,
            upstream_ca_certs: self.tls_upstream_ca.clone(),
            upstream_ca_certs_for: self.tls_upstream_ca_for.clone(),
            intercept_ca_cert: self.tls_ca_cert.clone(),
            intercept_ca_key: self.tls_ca_key.clone(),
        };
        cfg.validate()?;
        Ok(Some(cfg))
    }

    /// Sets the network flags so that [`VmmArgs::network`] reads `cfg` back (`--net none`
    /// with the policy's defaults and every rule spelled out).
    pub fn set_network(&mut self, cfg: &NetworkConfig) {
        let defaults = NetworkConfig::default();
        self.no_net = !cfg.enabled;
        self.net = Some(NetworkPreset::None);
        self.net_rule = cfg.policy.rules.clone();
        self.net_default_egress = Some(cfg.policy.default_egress);
        self.net_default_ingress = Some(cfg.policy.default_ingress);
        self.ports = cfg.ports.clone();
        self.nameservers = cfg.dns.nameservers.clone();
        self.dns_timeout_ms = (cfg.dns.query_timeout_ms != defaults.dns.query_timeout_ms)
            .then_some(cfg.dns.query_timeout_ms);
        self.no_dns_rebind_protection = !cfg.dns.rebind_protection;
        self.net_subnet = (cfg.subnet != defaults.subnet).then_some(cfg.subnet);
        self.mtu = (cfg.mtu != defaults.mtu).then_some(cfg.mtu);
        self.net_max_connections =
            (cfg.max_connections != defaults.max_connections).then_some(cfg.max_connections);
        let tls = &cfg.tls;
        self.tls = tls.enabled;
        self.tls_port = if tls.intercepted_ports == defaults.tls.intercepted_ports {
            Vec::new()
        } else {
            tls.intercepted_ports.clone()
        };
        self.tls_bypass = tls.bypass.clone();
        self.tls_no_verify = !tls.verify_upstream;
        self.tls_verify_for = tls.verify_upstream_for.clone();
        self.tls_allow_quic = !tls.block_quic;
        self.tls_upstream_ca = tls.upstream_ca_certs.clone();
        self.tls_upstream_ca_for = tls.upstream_ca_certs_for.clone();
        self.tls_ca_cert = tls.intercept_ca_cert.clone();
        self.tls_ca_key = tls.intercept_ca_key.clone();
    }

    /// The command line that `msb-vmm` parses back into these arguments (the command, if
    /// any, after `--`).
    pub fn to_args(&self) -> Vec<OsString> {
        let mut out: Vec<OsString> = Vec::new();
        let mut flag = |name: &str, values: &[OsString]| {
            out.push(format!("--{name}").into());
            out.extend(values.iter().cloned());
        };
        let one = |v: &dyn AsRef<std::ffi::OsStr>| [v.as_ref().to_os_string()];
        let text = |v: &dyn ToString| [OsString::from(v.to_string())];
        if let Some(v) = &self.kernel {
            flag("kernel", &one(v));
        }
        if let Some(v) = &self.initrd {
            flag("initrd", &one(v));
        }
        if let Some(v) = self.memory {
            flag("memory", &text(&v));
        }
        if let Some(v) = self.boot_memory {
            flag("boot-memory", &text(&v));
        }
        if let Some(v) = self.cpus {
            flag("cpus", &text(&v));
        }
        if let Some(v) = &self.kvm_path {
            flag("kvm-path", &one(v));
        }
        if let Some(v) = &self.serial_log {
            flag("serial-log", &one(v));
        }
        if self.console {
            flag("console", &[]);
        }
        if let Some(v) = self.timeout {
            flag("timeout", &text(&v));
        }
        if let Some(v) = &self.hostname {
            flag("hostname", &one(v));
        }
        for v in &self.append {
            flag("append", &one(v));
        }
        if let Some(v) = &self.report {
            flag("report", &one(v));
        }
        if let Some(v) = &self.vsock_socket {
            flag("vsock-socket", &one(v));
        }
        if let Some(v) = &self.control_socket {
            flag("control-socket", &one(v));
        }
        if let Some(v) = &self.exec_log {
            flag("exec-log", &one(v));
        }
        if self.exit_with_stdin {
            flag("exit-with-stdin", &[]);
        }
        for v in &self.layers {
            flag("layer", &one(v));
        }
        if let Some(v) = &self.rw {
            flag("rw", &one(v));
        }
        if let Some(v) = self.upper_size {
            flag("upper-size", &text(&v));
        }
        for v in self.volumes.chunks(2) {
            flag("volume", v);
        }
        for v in self.ro_volumes.chunks(2) {
            flag("ro-volume", v);
        }
        for v in self.disks.chunks(3) {
            flag("disk", v);
        }
        for v in self.tmpfs.chunks(2) {
            let v: Vec<OsString> = v.iter().map(OsString::from).collect();
            flag("tmpfs", &v);
        }
        if let Some(v) = &self.lock {
            flag("lock", &one(v));
        }
        if let Some(v) = self.idle_timeout {
            flag("idle-timeout", &text(&v));
        }
        if let Some(v) = self.max_duration {
            flag("max-duration", &text(&v));
        }
        if let Some(v) = &self.metrics {
            flag("metrics", &one(v));
        }
        if let Some(v) = &self.exit_record {
            flag("exit-record", &one(v));
        }
        if let Some(v) = &self.log_level {
            flag("log-level", &one(v));
        }
        if self.security != Security::Default {
            flag("security", &one(&self.security.as_str()));
        }
        if let Some(v) = &self.seccomp {
            flag("seccomp", &one(v));
        }
        if let Some(v) = &self.jail {
            flag("jail", &one(v));
        }
        if let Some(v) = &self.test_seccomp_violation {
            flag("test-seccomp-violation", &one(v));
        }
        if let Some(v) = &self.init {
            flag("init", &one(v));
        }
        for v in &self.init_arg {
            flag("init-arg", &one(v));
        }
        for v in &self.init_env {
            flag("init-env", &one(v));
        }
        if self.no_net {
            flag("no-net", &[]);
        }
        if let Some(v) = &self.net {
            flag("net", &text(v));
        }
        for v in &self.net_rule {
            flag("net-rule", &text(v));
        }
        if let Some(v) = self.net_default_egress {
            flag("net-default-egress", &text(&v));
        }
        if let Some(v) = self.net_default_ingress {
            flag("net-default-ingress", &text(&v));
        }
        for v in &self.ports {
            flag("port", &text(v));
        }
        for v in &self.nameservers {
            flag("dns", &text(v));
        }
        if let Some(v) = self.dns_timeout_ms {
            flag("dns-timeout-ms", &text(&v));
        }
        if self.no_dns_rebind_protection {
            flag("no-dns-rebind-protection", &[]);
        }
        if let Some(v) = self.net_subnet {
            flag("net-subnet", &text(&v));
        }
        if let Some(v) = self.mtu {
            flag("mtu", &text(&v));
        }
        if let Some(v) = self.net_max_connections {
            flag("net-max-connections", &text(&v));
        }
        if self.tls {
            flag("tls", &[]);
        }
        for v in &self.tls_port {
            flag("tls-port", &text(v));
        }
        for v in &self.tls_bypass {
            flag("tls-bypass", &text(v));
        }
        if self.tls_no_verify {
            flag("tls-no-verify", &[]);
        }
        for (p, on) in &self.tls_verify_for {
            let v = format!("{p}={}", if *on { "on" } else { "off" });
            flag("tls-verify-for", &text(&v));
        }
        if self.tls_allow_quic {
            flag("tls-allow-quic", &[]);
        }
        for v in &self.tls_upstream_ca {
            flag("tls-upstream-ca", &one(v));
        }
        for (p, path) in &self.tls_upstream_ca_for {
            let mut v = OsString::from(format!("{p}="));
            v.push(path);
            flag("tls-upstream-ca-for", &[v]);
        }
        if let Some(v) = &self.tls_ca_cert {
            flag("tls-ca-cert", &one(v));
        }
        if let Some(v) = &self.tls_ca_key {
            flag("tls-ca-key", &one(v));
        }
        if let Some(v) = &self.secrets_file {
            flag("secrets-file", &one(v));
        }
        if !self.command.is_empty() {
            out.push("--".into());
            out.extend(self.command.iter().cloned());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn values_read_what_they_write() {
        for v in [BootMemoryArg::All, BootMemoryArg::Mib(256)] {
            assert_eq!(v.to_string().parse::<BootMemoryArg>(), Ok(v));
        }
        assert!("lots".parse::<BootMemoryArg>().is_err());
        for v in [Security::Default, Security::Restricted] {
            assert_eq!(v.to_string().parse::<Security>(), Ok(v));
        }
        assert!("lax".parse::<Security>().is_err());
    }

    #[test]
    fn renders_flags_in_pairs_and_the_command_after_a_separator() {
        let mut a = VmmArgs {
            memory: Some(256),
            console: true,
            command: vec!["/bin/echo".into(), "--hi".into()],
            ..VmmArgs::default()
        };
        a.volume("/data", "/srv/data", true);
        a.tmpfs("/scratch", None);
        a.disk("/", "qcow2,rw,ext4", "/img/root.qcow2");
        let words: Vec<String> = a
            .to_args()
            .into_iter()
            .map(|w| w.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            words,
            [
                "--memory",
                "256",
                "--console",
                "--ro-volume",
                "/data",
                "/srv/data",
                "--disk",
                "/",
                "qcow2,rw,ext4",
                "/img/root.qcow2",
                "--tmpfs",
                "/scratch",
                "-",
                "--",
                "/bin/echo",
                "--hi"
            ]
        );
    }

    #[test]
    fn a_network_survives_the_flags() {
        use crate::network::{NetworkConfig, NetworkPolicy, PortProtocol, PublishedPort};
        let mut cfg = NetworkConfig {
            policy: NetworkPolicy::public_only(),
            ports: vec![
                PublishedPort::new(PortProtocol::Tcp, 8080, 80),
                "0.0.0.0:5353:53/udp".parse().unwrap(),
            ],
            mtu: 1500,
            ..NetworkConfig::default()
        };
        cfg.policy
            .rules
            .insert(0, "deny egress suffix=evil.com".parse().unwrap());
        cfg.dns.nameservers = vec!["127.0.0.1:5300".parse().unwrap()];
        cfg.dns.rebind_protection = false;
        cfg.tls.enabled = true;
        cfg.tls.intercepted_ports = vec![443, 8443];
        cfg.tls.bypass = vec!["*.internal.test".parse().unwrap()];
        cfg.tls.verify_upstream_for = vec![("self.test".parse().unwrap(), false)];
        cfg.tls.upstream_ca_certs = vec!["/ca/test.pem".into()];
        cfg.tls.upstream_ca_certs_for = vec![("api.test".parse().unwrap(), "/ca/api.pem".into())];
        cfg.tls.intercept_ca_cert = Some("/home/tls/ca.pem".into());
        cfg.tls.intercept_ca_key = Some("/home/tls/ca.key".into());
        let mut a = VmmArgs::default();
        a.set_network(&cfg);
        assert_eq!(a.network().unwrap(), Some(cfg.clone()));
        assert!(a.to_args().iter().any(|w| w == "--net-rule"));
        assert!(a.to_args().iter().any(|w| w == "api.test=/ca/api.pem"));
        assert_eq!(
            verify_for("self.test=off"),
            Ok(("self.test".parse().unwrap(), false))
        );
        assert!(verify_for("self.test=maybe").is_err());
        assert!(ca_for("*.x.test=").is_err());
        a.set_network(&NetworkConfig::disabled());
        assert_eq!(a.network().unwrap(), None);
        // No flags: the default network, public only.
        assert_eq!(
            VmmArgs::default().network().unwrap(),
            Some(NetworkConfig::default())
        );
        // Rules go before the preset's.
        let b = VmmArgs {
            net: Some("public,host".parse().unwrap()),
            net_rule: vec!["deny egress tcp any 25".parse().unwrap()],
            ..VmmArgs::default()
        };
        let policy = b.network().unwrap().unwrap().policy;
        assert_eq!(policy.rules.len(), 3);
        assert_eq!(policy.rules[0].to_string(), "deny egress tcp any 25");
    }
}
