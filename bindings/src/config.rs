//! The sandbox configuration of `create` (the Python page's keyword arguments, the Go
//! page's options) onto [`SandboxBuilder`], and the per-call options of exec and logs.
//! Every struct refuses fields it does not know, so a misspelt option is an error, not
//! silently ignored.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use microsandbox::network::{NetworkPolicy, NetworkPreset, Rule, ViolationAction};
use microsandbox::{
    ExecOptions, Init, LogLevel, LogOptions, LogSource, LogStreamOptions, PullPolicy, RegistryAuth,
    Rlimit, SandboxBuilder, SecurityProfile, Stdin,
};
use serde::Deserialize;

use crate::error::BindError;

/// `create`'s `config`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SandboxSpec {
    image: Option<ImageSpec>,
    snapshot: Option<String>,
    cpus: Option<u8>,
    memory: Option<u32>,
    workdir: Option<String>,
    shell: Option<String>,
    hostname: Option<String>,
    user: Option<String>,
    entrypoint: Option<Vec<String>>,
    init: Option<InitSpec>,
    #[serde(default)]
    replace: bool,
    replace_with_timeout: Option<f64>,
    max_duration: Option<f64>,
    idle_timeout: Option<f64>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    scripts: BTreeMap<String, String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    pull_policy: Option<PullPolicy>,
    log_level: Option<LogLevel>,
    #[serde(default)]
    quiet_logs: bool,
    ephemeral: Option<bool>,
    security_profile: Option<SecurityProfile>,
    registry_auth: Option<AuthSpec>,
    #[serde(default)]
    volumes: BTreeMap<String, VolumeSpec>,
    #[serde(default)]
    patches: Vec<PatchSpec>,
    #[serde(default)]
    ports: Vec<PortSpec>,
    network: Option<NetworkSpec>,
    #[serde(default)]
    secrets: Vec<SecretSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ImageSpec {
    Plain(String),
    Oci {
        oci: String,
        upper_size_mib: Option<u32>,
    },
    Disk {
        disk: PathBuf,
        fstype: Option<String>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum InitSpec {
    Named(String),
    Cmd {
        cmd: String,
        #[serde(default)]
        args: Vec<String>,
        #[serde(default)]
        env: BTreeMap<String, String>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthSpec {
    username: String,
    password: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeSpec {
    bind: Option<PathBuf>,
    named: Option<String>,
    #[serde(default)]
    tmpfs: bool,
    disk: Option<PathBuf>,
    fstype: Option<String>,
    #[serde(default)]
    readonly: bool,
    size_mib: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum PatchSpec {
    Text {
        path: String,
        content: String,
        mode: Option<u32>,
        #[serde(default)]
        replace: bool,
    },
    Append {
        path: String,
        content: String,
    },
    Mkdir {
        path: String,
        mode: Option<u32>,
    },
    Remove {
        path: String,
    },
    Symlink {
        target: String,
        link: String,
        #[serde(default)]
        replace: bool,
    },
    CopyFile {
        src: PathBuf,
        dst: String,
        mode: Option<u32>,
        #[serde(default)]
        replace: bool,
    },
    CopyDir {
        src: PathBuf,
        dst: String,
        #[serde(default)]
        replace: bool,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortSpec {
    host: u16,
    guest: u16,
    #[serde(default)]
    protocol: PortProto,
    bind: Option<IpAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum PortProto {
    #[default]
    Tcp,
    Udp,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkSpec {
    enabled: Option<bool>,
    policy: Option<String>,
    #[serde(default)]
    rules: Vec<String>,
    dns: Option<DnsSpec>,
    max_connections: Option<usize>,
    mtu: Option<u16>,
    tls: Option<TlsSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DnsSpec {
    nameservers: Option<Vec<String>>,
    rebind_protection: Option<bool>,
    query_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSpec {
    enabled: Option<bool>,
    #[serde(default)]
    bypass: Vec<String>,
    verify_upstream: Option<bool>,
    intercepted_ports: Option<Vec<u16>>,
    block_quic: Option<bool>,
    upstream_ca_cert: Option<PathBuf>,
    intercept_ca_cert: Option<PathBuf>,
    intercept_ca_key: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretSpec {
    env: String,
    value: Option<String>,
    host_env: Option<String>,
    file: Option<PathBuf>,
    #[serde(default)]
    allow_hosts: Vec<String>,
    #[serde(default)]
    allow_host_patterns: Vec<String>,
    allow_any_host_dangerous: Option<bool>,
    placeholder: Option<String>,
    on_violation: Option<String>,
    require_tls_identity: Option<bool>,
    inject_headers: Option<bool>,
    inject_basic_auth: Option<bool>,
    inject_query: Option<bool>,
    inject_body: Option<bool>,
}

/// Seconds from a caller: finite, not negative, at most a century.
pub(crate) fn secs(what: &str, s: f64) -> Result<Duration, BindError> {
    if !s.is_finite() || !(0.0..=3.2e9).contains(&s) {
        return Err(BindError::arg(format!(
            "{what} must be a number of seconds from 0 to 3.2e9, not {s}"
        )));
    }
    Ok(Duration::from_secs_f64(s))
}

/// Whole seconds (the SDK's idle timeout and maximum duration), a fraction rounded up.
fn whole_secs(what: &str, s: f64) -> Result<u64, BindError> {
    let d = secs(what, s)?;
    if d.is_zero() {
        return Err(BindError::arg(format!(
            "{what} must be more than 0 seconds"
        )));
    }
    Ok(d.as_secs_f64().ceil() as u64)
}

impl SandboxSpec {
    /// The builder of sandbox `name`; what the SDK checks itself (names, ranges, paths) it
    /// reports when the sandbox is created.
    pub(crate) fn builder(self, name: &str) -> Result<SandboxBuilder, BindError> {
        let mut b = microsandbox::Sandbox::builder(name);
        match self.image {
            None => {}
            Some(ImageSpec::Plain(s)) => b = b.image(s),
            Some(ImageSpec::Oci {
                oci,
                upper_size_mib,
            }) => {
                b = b.image_with(|i| {
                    let i = i.oci(oci);
                    match upper_size_mib {
                        Some(n) => i.upper_size_mib(n),
                        None => i,
                    }
                })
            }
            Some(ImageSpec::Disk { disk, fstype }) => {
                b = b.image_with(|i| {
                    let i = i.disk(disk);
                    match fstype {
                        Some(f) => i.fstype(f),
                        None => i,
                    }
                })
            }
        }
        if let Some(s) = self.snapshot {
            b = b.snapshot(s);
        }
        if let Some(n) = self.cpus {
            b = b.cpus(n);
        }
        if let Some(m) = self.memory {
            b = b.memory(m);
        }
        if let Some(v) = self.workdir {
            b = b.workdir(v);
        }
        if let Some(v) = self.shell {
            b = b.shell(v);
        }
        if let Some(v) = self.hostname {
            b = b.hostname(v);
        }
        if let Some(v) = self.user {
            b = b.user(v);
        }
        if let Some(v) = self.entrypoint {
            b = b.entrypoint(v);
        }
        match self.init {
            None => {}
            Some(InitSpec::Named(n)) if n == "auto" => b = b.init(Init::auto()),
            Some(InitSpec::Named(n)) => b = b.init(Init::path(n)),
            Some(InitSpec::Cmd { cmd, args, env }) => {
                let mut init = Init::path(cmd).args(args);
                for (k, v) in env {
                    init = init.env(k, v);
                }
                b = b.init(init);
            }
        }
        match self.replace_with_timeout {
            Some(t) => b = b.replace_with_timeout(secs("replace_with_timeout", t)?),
            None if self.replace => b = b.replace(),
            None => {}
        }
        if let Some(t) = self.max_duration {
            b = b.max_duration(whole_secs("max_duration", t)?);
        }
        if let Some(t) = self.idle_timeout {
            b = b.idle_timeout(whole_secs("idle_timeout", t)?);
        }
        for (k, v) in self.env {
            b = b.env(k, v);
        }
        for (k, v) in self.scripts {
            b = b.script(k, v);
        }
        b = b.labels(self.labels);
        if let Some(p) = self.pull_policy {
            b = b.pull_policy(p);
        }
        if let Some(l) = self.log_level {
            b = b.log_level(l);
        }
        if self.quiet_logs {
            b = b.quiet_logs();
        }
        if let Some(e) = self.ephemeral {
            b = b.ephemeral(e);
        }
        if let Some(p) = self.security_profile {
            b = b.security_profile(p);
        }
        if let Some(a) = self.registry_auth {
            b = b.registry_auth(RegistryAuth::Basic {
                username: a.username,
                password: a.password,
            });
        }
        for (guest, v) in self.volumes {
            b = volume(b, guest, v)?;
        }
        if !self.patches.is_empty() {
            b = b.patch(|mut p| {
                for spec in self.patches {
                    p = patch(p, spec);
                }
                p
            });
        }
        if let Some(n) = self.network {
            b = network(b, n)?;
        }
        for p in self.ports {
            b = b.network(|n| match (p.protocol, p.bind) {
                (PortProto::Tcp, None) => n.port(p.host, p.guest),
                (PortProto::Udp, None) => n.port_udp(p.host, p.guest),
                (PortProto::Tcp, Some(ip)) => n.port_bind(ip, p.host, p.guest),
                (PortProto::Udp, Some(ip)) => n.port_udp_bind(ip, p.host, p.guest),
            });
        }
        for s in self.secrets {
            b = secret(b, s)?;
        }
        Ok(b)
    }
}

fn volume(b: SandboxBuilder, guest: String, v: VolumeSpec) -> Result<SandboxBuilder, BindError> {
    let sources = usize::from(v.bind.is_some())
        + usize::from(v.named.is_some())
        + usize::from(v.tmpfs)
        + usize::from(v.disk.is_some());
    if sources != 1 {
        return Err(BindError::arg(format!(
            "volume {guest:?} needs exactly one of bind, named, tmpfs or disk"
        )));
    }
    Ok(b.volume(guest, |mut m| {
        if let Some(p) = v.bind {
            m = m.bind(p);
        }
        if let Some(n) = v.named {
            m = m.named(n);
        }
        if v.tmpfs {
            m = m.tmpfs();
        }
        if let Some(d) = v.disk {
            m = m.disk(d);
        }
        if let Some(f) = v.fstype {
            m = m.fstype(f);
        }
        if v.readonly {
            m = m.readonly();
        }
        if let Some(s) = v.size_mib {
            m = m.size(s);
        }
        m
    }))
}

fn patch(p: microsandbox::PatchBuilder, spec: PatchSpec) -> microsandbox::PatchBuilder {
    match spec {
        PatchSpec::Text {
            path,
            content,
            mode,
            replace,
        } => p.text(path, content, mode, replace),
        PatchSpec::Append { path, content } => p.append(path, content),
        PatchSpec::Mkdir { path, mode } => p.mkdir(path, mode),
        PatchSpec::Remove { path } => p.remove(path),
        PatchSpec::Symlink {
            target,
            link,
            replace,
        } => p.symlink(target, link, replace),
        PatchSpec::CopyFile {
            src,
            dst,
            mode,
            replace,
        } => p.copy_file(src, dst, mode, replace),
        PatchSpec::CopyDir { src, dst, replace } => p.copy_dir(src, dst, replace),
    }
}

fn network(b: SandboxBuilder, n: NetworkSpec) -> Result<SandboxBuilder, BindError> {
    let bad =
        |what: &str, e: &dyn std::fmt::Display| BindError::arg(format!("network {what}: {e}"));
    let policy = if n.policy.is_some() || !n.rules.is_empty() {
        let mut policy = match &n.policy {
            Some(p) => p
                .parse::<NetworkPreset>()
                .map_err(|e| bad("policy", &e))?
                .policy(),
            None => NetworkPolicy::public_only(),
        };
        let mut rules = n
            .rules
            .iter()
            .map(|r| r.parse::<Rule>().map_err(|e| bad("rule", &e)))
            .collect::<Result<Vec<_>, _>>()?;
        rules.append(&mut policy.rules);
        policy.rules = rules;
        Some(policy)
    } else {
        None
    };
    let mut tls_bypass = Vec::new();
    Ok(b.network(|mut nb| {
        if let Some(e) = n.enabled {
            nb = nb.enabled(e);
        }
        if let Some(p) = policy {
            nb = nb.policy(p);
        }
        if let Some(d) = n.dns {
            nb = nb.dns(|mut db| {
                if let Some(ns) = d.nameservers {
                    db = db.nameservers(ns);
                }
                if let Some(r) = d.rebind_protection {
                    db = db.rebind_protection(r);
                }
                if let Some(t) = d.query_timeout_ms {
                    db = db.query_timeout_ms(t);
                }
                db
            });
        }
        if let Some(m) = n.max_connections {
            nb = nb.max_connections(m);
        }
        if let Some(m) = n.mtu {
            nb = nb.mtu(m);
        }
        if let Some(t) = n.tls {
            tls_bypass = t.bypass;
            nb = nb.tls(|mut tb| {
                tb = tb.enabled(t.enabled.unwrap_or(true));
                for p in &tls_bypass {
                    tb = tb.bypass(p);
                }
                if let Some(v) = t.verify_upstream {
                    tb = tb.verify_upstream(v);
                }
                if let Some(p) = t.intercepted_ports {
                    tb = tb.intercepted_ports(p);
                }
                if let Some(q) = t.block_quic {
                    tb = tb.block_quic(q);
                }
                if let Some(c) = t.upstream_ca_cert {
                    tb = tb.upstream_ca_cert(c);
                }
                if let Some(c) = t.intercept_ca_cert {
                    tb = tb.intercept_ca_cert(c);
                }
                if let Some(k) = t.intercept_ca_key {
                    tb = tb.intercept_ca_key(k);
                }
                tb
            });
        }
        nb
    }))
}

fn secret(b: SandboxBuilder, s: SecretSpec) -> Result<SandboxBuilder, BindError> {
    use microsandbox::SecretSource;
    let source = match (s.value, s.host_env, s.file) {
        (Some(v), None, None) => SecretSource::Value(v),
        (None, Some(e), None) => SecretSource::HostEnv(e),
        (None, None, Some(f)) => SecretSource::File(f),
        _ => {
            return Err(BindError::arg(format!(
                "secret {:?} needs exactly one of value, host_env or file",
                s.env
            )))
        }
    };
    let on_violation = s
        .on_violation
        .map(|v| {
            v.parse::<ViolationAction>()
                .map_err(|e| BindError::arg(format!("secret {:?} on_violation: {e}", s.env)))
        })
        .transpose()?;
    Ok(b.secret(|mut sb| {
        sb = sb.env(s.env).source(source);
        for h in s.allow_hosts {
            sb = sb.allow_host(h);
        }
        for p in s.allow_host_patterns {
            sb = sb.allow_host_pattern(p);
        }
        if let Some(v) = s.allow_any_host_dangerous {
            sb = sb.allow_any_host_dangerous(v);
        }
        if let Some(p) = s.placeholder {
            sb = sb.placeholder(p);
        }
        if let Some(a) = on_violation {
            sb = sb.on_violation(a);
        }
        if let Some(v) = s.require_tls_identity {
            sb = sb.require_tls_identity(v);
        }
        if let Some(v) = s.inject_headers {
            sb = sb.inject_headers(v);
        }
        if let Some(v) = s.inject_basic_auth {
            sb = sb.inject_basic_auth(v);
        }
        if let Some(v) = s.inject_query {
            sb = sb.inject_query(v);
        }
        if let Some(v) = s.inject_body {
            sb = sb.inject_body(v);
        }
        sb
    }))
}

/// Per-command options of exec, shell and their streams.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExecSpec {
    cwd: Option<String>,
    user: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    timeout: Option<f64>,
    stdin_b64: Option<String>,
    #[serde(default)]
    stdin_pipe: bool,
    #[serde(default)]
    tty: bool,
    #[serde(default)]
    rlimits: Vec<RlimitSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RlimitSpec {
    resource: String,
    soft: u64,
    hard: u64,
}

impl ExecSpec {
    /// Whether the caller writes stdin (streams only).
    pub(crate) fn stdin_pipe(&self) -> bool {
        self.stdin_pipe
    }

    /// The options, checked (a bad base64 stdin or timeout is the caller's error).
    pub(crate) fn options(
        self,
        args: Vec<String>,
    ) -> Result<impl FnOnce(ExecOptions) -> ExecOptions, BindError> {
        let timeout = self.timeout.map(|t| secs("timeout", t)).transpose()?;
        let stdin = match (self.stdin_b64, self.stdin_pipe) {
            (Some(_), true) => {
                return Err(BindError::arg("give stdin_b64 or stdin_pipe, not both"))
            }
            (Some(b), false) => Stdin::Bytes(decode("stdin_b64", &b)?),
            (None, true) => Stdin::Pipe,
            (None, false) => Stdin::Null,
        };
        Ok(move |mut o: ExecOptions| {
            o = o.args(args).envs(self.env).stdin(stdin).tty(self.tty);
            if let Some(c) = self.cwd {
                o = o.cwd(c);
            }
            if let Some(u) = self.user {
                o = o.user(u);
            }
            if let Some(t) = timeout {
                o = o.timeout(t);
            }
            for r in self.rlimits {
                o = o.rlimit(Rlimit::new(r.resource, r.soft, r.hard));
            }
            o
        })
    }
}

/// Standard padded base64 from a caller.
pub(crate) fn decode(what: &str, b64: &str) -> Result<Vec<u8>, BindError> {
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| BindError::arg(format!("{what} is not base64: {e}")))
}

fn time(what: &str, ms: f64) -> Result<chrono::DateTime<chrono::Utc>, BindError> {
    if !ms.is_finite() {
        return Err(BindError::arg(format!("{what} must be a finite number")));
    }
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .ok_or_else(|| BindError::arg(format!("{what} {ms} is out of range")))
}

fn sources(list: Option<Vec<String>>) -> Result<Vec<LogSource>, BindError> {
    let Some(list) = list else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for s in list {
        if s == "all" {
            out.extend([
                LogSource::Stdout,
                LogSource::Stderr,
                LogSource::Output,
                LogSource::System,
            ]);
        } else {
            out.push(
                s.parse::<LogSource>()
                    .map_err(|e| BindError::arg(format!("log source {s:?}: {e}")))?,
            );
        }
    }
    Ok(out)
}

/// `logs` options.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogSpec {
    tail: Option<usize>,
    since_ms: Option<f64>,
    until_ms: Option<f64>,
    sources: Option<Vec<String>>,
}

impl LogSpec {
    pub(crate) fn options(self) -> Result<LogOptions, BindError> {
        let mut o = LogOptions::default().sources(sources(self.sources)?);
        if let Some(t) = self.tail {
            o = o.tail(t);
        }
        if let Some(s) = self.since_ms {
            o = o.since(time("since_ms", s)?);
        }
        if let Some(u) = self.until_ms {
            o = o.until(time("until_ms", u)?);
        }
        Ok(o)
    }
}

/// `log_stream` options.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogStreamSpec {
    sources: Option<Vec<String>>,
    since_ms: Option<f64>,
    until_ms: Option<f64>,
    from_cursor: Option<String>,
    follow: Option<bool>,
}

impl LogStreamSpec {
    pub(crate) fn options(self) -> Result<LogStreamOptions, BindError> {
        let mut o = LogStreamOptions::default().sources(sources(self.sources)?);
        if let Some(s) = self.since_ms {
            o = o.since(time("since_ms", s)?);
        }
        if let Some(u) = self.until_ms {
            o = o.until(time("until_ms", u)?);
        }
        if let Some(c) = self.from_cursor {
            o = o.from_cursor(c);
        }
        Ok(o.follow(self.follow.unwrap_or(false)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> Result<SandboxBuilder, String> {
        let s: SandboxSpec = serde_json::from_value(v).map_err(|e| e.to_string())?;
        s.builder("t").map_err(|e| e.message)
    }

    #[test]
    fn a_full_config_maps_onto_the_builder() {
        let full = json!({
            "image": {"oci": "python:3.12", "upper_size_mib": 64}, "cpus": 2, "memory": 256,
            "workdir": "/app", "shell": "/bin/bash", "hostname": "h", "user": "nobody",
            "entrypoint": ["python"], "init": {"cmd": "/sbin/init", "args": ["-v"], "env": {"A": "1"}},
            "replace_with_timeout": 2.5, "max_duration": 60, "idle_timeout": 0.5,
            "env": {"K": "V"}, "scripts": {"hi": "echo hi"}, "labels": {"team": "a"},
            "pull_policy": "if-missing", "log_level": "debug", "quiet_logs": true,
            "ephemeral": true, "security_profile": "restricted",
            "registry_auth": {"username": "u", "password": "p"},
            "volumes": {"/data": {"named": "cache"}, "/scratch": {"tmpfs": true, "size_mib": 16},
                        "/src": {"bind": "/tmp", "readonly": true}},
            "patches": [{"op": "text", "path": "/etc/motd", "content": "hi"},
                        {"op": "mkdir", "path": "/app", "mode": 493},
                        {"op": "symlink", "target": "/a", "link": "/b"}],
            "ports": [{"host": 8080, "guest": 80}, {"host": 5353, "guest": 53, "protocol": "udp", "bind": "127.0.0.1"}],
            "network": {"policy": "public-only", "rules": ["deny egress tcp any 25"],
                        "dns": {"nameservers": ["127.0.0.1"], "rebind_protection": false},
                        "tls": {"bypass": ["*.internal"], "verify_upstream": true}},
            "secrets": [{"env": "API_KEY", "value": "s3cret", "allow_hosts": ["api.example.com"],
                         "on_violation": "block-and-log"}],
        });
        spec(full).expect("every option is taken");
        spec(json!({})).expect("nothing is required");
        spec(json!({"image": "alpine"})).expect("a plain image");
        spec(json!({"image": {"disk": "/x.raw", "fstype": "ext4"}})).expect("a disk root");
        spec(json!({"init": "auto"})).expect("init auto");
    }

    #[test]
    fn misspelt_or_bad_options_are_refused() {
        let e = spec(json!({"memroy": 512})).expect_err("unknown field");
        assert!(e.contains("memroy"), "{e}");
        assert!(spec(json!({"cpus": -1})).is_err());
        assert!(spec(json!({"pull_policy": "sometimes"})).is_err());
        let e = spec(json!({"volumes": {"/d": {"named": "a", "tmpfs": true}}})).expect_err("two");
        assert!(e.contains("exactly one"), "{e}");
        assert!(spec(json!({"volumes": {"/d": {}}})).is_err());
        let e = spec(json!({"secrets": [{"env": "K"}]})).expect_err("no source");
        assert!(e.contains("exactly one of value"), "{e}");
        let e = spec(json!({"secrets": [{"env": "K", "value": "v", "on_violation": "shrug"}]}))
            .expect_err("bad action");
        assert!(e.contains("on_violation"), "{e}");
        let e = spec(json!({"network": {"rules": ["frobnicate"]}})).expect_err("bad rule");
        assert!(e.contains("network rule"), "{e}");
        assert!(spec(json!({"network": {"policy": "everything"}})).is_err());
        assert!(spec(json!({"max_duration": -3})).is_err());
        assert!(spec(json!({"idle_timeout": 0})).is_err());
        assert!(spec(json!({"replace_with_timeout": 1e300})).is_err());
        assert!(spec(json!({"patches": [{"op": "chmod", "path": "/x"}]})).is_err());
        assert!(spec(json!({"patches": [{"op": "remove", "path": "/x", "extra": 1}]})).is_err());
    }

    #[test]
    fn exec_and_log_options_are_checked() {
        let e: ExecSpec = serde_json::from_value(json!({"stdin_b64": "aGk=", "stdin_pipe": true}))
            .expect("shape");
        assert!(e.options(Vec::new()).is_err());
        let e: ExecSpec = serde_json::from_value(json!({"stdin_b64": "%%%"})).expect("shape");
        assert!(e.options(Vec::new()).is_err());
        let e: ExecSpec = serde_json::from_value(json!({"timeout": f64::MAX})).expect("shape");
        assert!(e.options(Vec::new()).is_err());
        assert!(serde_json::from_value::<ExecSpec>(json!({"cwdir": "/"})).is_err());
        let l: LogSpec =
            serde_json::from_value(json!({"sources": ["all"], "tail": 3})).expect("shape");
        let o = l.options().expect("all is four sources");
        assert_eq!((o.sources.len(), o.tail), (4, Some(3)));
        let l: LogSpec = serde_json::from_value(json!({"sources": ["stdin"]})).expect("shape");
        assert!(l.options().is_err());
        let s: LogStreamSpec =
            serde_json::from_value(json!({"follow": true, "since_ms": 1.0e12})).expect("shape");
        let o = s.options().expect("options");
        assert!(o.follow && o.since.is_some());
    }
}
