//! The life of a sandbox: `run`, `create`, `start`, `stop`, `kill`, `rm`, `drain`, `ls`
//! and `inspect`.

use std::io::IsTerminal;

use chrono::Utc;
use microsandbox::network::{NetworkPolicy, NetworkPreset, PortProtocol};
use microsandbox::{
    error_chain, ExecOptions, Init, MicrosandboxError, MountBuilder, Sandbox, SandboxBuilder,
    SandboxFilter, SecretSource, SecurityProfile,
};
use serde_json::{json, Value};

use crate::args::{CreateArgs, CreateOpts, LsArgs, NameArg, RmArgs, RunArgs, StopArgs};
use crate::error::{exit_byte, out, report, say, CliError, CliResult};
use crate::format::{handle_json, json_line, labels_text, relative_time, table};
use crate::parse::entrypoint_words;
use crate::progress::{show_progress, with_stage_line};
use crate::run::{split_argv, stream_command};

impl CreateOpts {
    fn builder(&self, name: &str) -> SandboxBuilder {
        let mut b = Sandbox::builder(name);
        if let Some(image) = &self.image {
            b = b.image(image.clone());
        }
        if let Some(snapshot) = &self.snapshot {
            b = b.snapshot(snapshot);
        }
        b = b.pull_options(self.registry.options(self.pull));
        if let Some(n) = self.cpus {
            b = b.cpus(n);
        }
        if let Some(m) = self.memory {
            b = b.memory(m);
        }
        for (k, v) in &self.env {
            b = b.env(k.clone(), v.clone());
        }
        if let Some(w) = &self.workdir {
            b = b.workdir(w.clone());
        }
        if let Some(u) = &self.user {
            b = b.user(u.clone());
        }
        if let Some(h) = &self.hostname {
            b = b.hostname(h.clone());
        }
        if let Some(s) = &self.shell {
            b = b.shell(s.clone());
        }
        b = b.labels(self.labels.iter().cloned());
        let ro = |m: MountBuilder, readonly: bool| if readonly { m.readonly() } else { m };
        for v in &self.volumes {
            let (host, readonly) = (v.host.clone(), v.readonly);
            b = b.volume(v.guest.clone(), move |m| ro(m.bind(host), readonly));
        }
        for v in &self.named_volumes {
            let (name, readonly) = (v.name.clone(), v.readonly);
            b = b.volume(v.guest.clone(), move |m| ro(m.named(name), readonly));
        }
        for v in &self.disk_volumes {
            let (image, readonly) = (v.host.clone(), v.readonly);
            b = b.volume(v.guest.clone(), move |m| ro(m.disk(image), readonly));
        }
        if self.fstype.is_some() || self.upper_size.is_some() {
            let (fstype, upper) = (self.fstype.clone(), self.upper_size);
            b = b.image_with(move |mut i| {
                if let Some(f) = fstype {
                    i = i.fstype(f);
                }
                if let Some(u) = upper {
                    i = i.upper_size_mib(u);
                }
                i
            });
        }
        for t in &self.tmpfs {
            let size = t.size_mib;
            b = b.volume(t.guest.clone(), move |m| match size {
                Some(s) => m.tmpfs().size(s),
                None => m.tmpfs(),
            });
        }
        if let Some(s) = self.idle_timeout {
            b = b.idle_timeout(s);
        }
        if let Some(s) = self.max_duration {
            b = b.max_duration(s);
        }
        if self.replace {
            b = b.replace();
        }
        if self.ephemeral {
            b = b.ephemeral(true);
        }
        if !self.entrypoint.is_empty() {
            b = b.entrypoint(entrypoint_words(&self.entrypoint));
        }
        if self.restricted {
            b = b.security_profile(SecurityProfile::Restricted);
        }
        if let Some(init) = &self.init {
            let init = match init.as_str() {
                "auto" => Init::auto(),
                path => Init::path(path),
            };
            b = b.init(init.args(self.init_args.iter().cloned()));
        }
        if self.quiet_logs {
            b = b.quiet_logs();
        }
        if self.no_net {
            b = b.disable_network();
        } else {
            b = b.network(|mut n| {
                if self.net.is_some() || !self.net_rules.is_empty() {
                    let mut policy = self
                        .net
                        .as_ref()
                        .map_or_else(NetworkPolicy::public_only, NetworkPreset::policy);
                    let mut rules = self.net_rules.clone();
                    rules.append(&mut policy.rules);
                    policy.rules = rules;
                    n = n.policy(policy);
                }
                for p in &self.ports {
                    n = match p.protocol {
                        PortProtocol::Tcp => n.port_bind(p.bind, p.host, p.guest),
                        PortProtocol::Udp => n.port_udp_bind(p.bind, p.host, p.guest),
                    };
                }
                if !self.dns.is_empty() {
                    n = n.dns(|d| d.nameservers(&self.dns));
                }
                if self.tls_intercept
                    || !self.tls_bypass.is_empty()
                    || !self.tls_upstream_ca.is_empty()
                {
                    n = n.tls(|mut t| {
                        t = t.enabled(self.tls_intercept || !self.secrets.is_empty());
                        for b in &self.tls_bypass {
                            t = t.bypass(b);
                        }
                        for c in &self.tls_upstream_ca {
                            t = t.upstream_ca_cert(c);
                        }
                        t
                    });
                }
                for s in &self.secrets {
                    n = n.secret(|mut b| {
                        b = b.env(&s.env).source(match &s.value {
                            Some(v) => SecretSource::Value(v.clone()),
                            None => SecretSource::HostEnv(s.env.clone()),
                        });
                        for h in &s.hosts {
                            b = b.allow_host_pattern(h);
                        }
                        b
                    });
                }
                n
            });
        }
        if let Some(l) = self.log_level {
            b = b.log_level(l.into());
        }
        b
    }
}

pub(crate) async fn cmd_run(a: RunArgs) -> CliResult<u8> {
    let tty_in = std::io::stdin().is_terminal();
    // Found out before a boot, not after.
    if a.tty && !tty_in {
        return Err(MicrosandboxError::NotATerminal("stdin is not a terminal".into()).into());
    }
    if !a.create.entrypoint.is_empty() && entrypoint_words(&a.create.entrypoint).is_empty() {
        return Err(CliError::Usage("--entrypoint is empty".into()));
    }
    // Without --keep the sandbox is ephemeral: a run killed before its cleanup still
    // leaves nothing behind (its VMM ends with msb, and the next reader removes it).
    let sb = a
        .create
        .builder(&a.name)
        .ephemeral(a.create.ephemeral || !a.keep)
        .create_with_progress();
    let sb = show_progress(sb, Some(&a.name)).await?;
    let result = run_in(&sb, &a, tty_in).await;

    let mut cleanup = Vec::new();
    if let Err(e) = sb.stop().await {
        cleanup.push(format!("stopping {}: {}", a.name, error_chain(&e)));
    }
    if !a.keep {
        match Sandbox::remove(&a.name).await {
            Ok(()) | Err(MicrosandboxError::NotFound(_)) => {}
            Err(e) => cleanup.push(format!("removing {}: {}", a.name, error_chain(&e))),
        }
    }
    for c in &cleanup {
        say(&format!("msb: error: {c}"));
    }
    let code = exit_byte(result?);
    Ok(if cleanup.is_empty() || code != 0 {
        code
    } else {
        1
    })
}

async fn run_in(sb: &Sandbox, a: &RunArgs, tty_in: bool) -> CliResult<i32> {
    let argv = if a.command.is_empty() {
        sb.default_command()
    } else {
        Some(a.command.clone())
    };
    match argv {
        Some(argv) => {
            let (cmd, args) = split_argv(&argv)?;
            if a.tty {
                Ok(sb.attach(cmd, args).await?)
            } else {
                stream_command(sb, cmd, ExecOptions::default().args(args), None).await
            }
        }
        None if tty_in => Ok(sb.attach_shell().await?),
        None => Err(CliError::Failed(
            "no command given and the sandbox has no entrypoint: pass one \
             (msb run NAME -- CMD ARGS...), or set --entrypoint"
                .into(),
        )),
    }
}

pub(crate) async fn cmd_create(a: CreateArgs) -> CliResult<u8> {
    if !a.create.entrypoint.is_empty() && entrypoint_words(&a.create.entrypoint).is_empty() {
        return Err(CliError::Usage("--entrypoint is empty".into()));
    }
    let sb = show_progress(
        a.create.builder(&a.name).create_detached_with_progress(),
        Some(&a.name),
    )
    .await?;
    out(format!("{}\n", sb.name()).as_bytes())?;
    Ok(0)
}

pub(crate) async fn cmd_start(a: NameArg) -> CliResult<u8> {
    let tty = std::io::stderr().is_terminal();
    let start = std::time::Instant::now();
    let sb = with_stage_line(Sandbox::start_detached(&a.name), &a.name, start, tty).await?;
    out(format!("{}\n", sb.name()).as_bytes())?;
    Ok(0)
}

pub(crate) async fn cmd_stop(a: StopArgs) -> CliResult<u8> {
    Sandbox::get(&a.name)
        .await?
        .stop_with_timeout(a.timeout)
        .await?;
    out(format!("{}\n", a.name).as_bytes())?;
    Ok(0)
}

pub(crate) async fn cmd_kill(a: NameArg) -> CliResult<u8> {
    Sandbox::get(&a.name).await?.kill().await?;
    out(format!("{}\n", a.name).as_bytes())?;
    Ok(0)
}

async fn remove_one(name: &str, force: bool) -> CliResult<()> {
    if force {
        let h = Sandbox::get(name).await?;
        if !h.status().is_terminal() {
            h.stop().await?;
        }
    }
    Sandbox::remove(name).await?;
    Ok(())
}

pub(crate) async fn cmd_rm(a: RmArgs) -> CliResult<u8> {
    let mut failed = false;
    for name in &a.names {
        match remove_one(name, a.force).await {
            Ok(()) => out(format!("{name}\n").as_bytes())?,
            Err(e) => {
                report(&e);
                failed = true;
            }
        }
    }
    if failed {
        Err(CliError::Reported)
    } else {
        Ok(0)
    }
}

pub(crate) async fn cmd_drain(a: NameArg) -> CliResult<u8> {
    Sandbox::connect(&a.name).await?.drain().await?;
    out(format!("{}\n", a.name).as_bytes())?;
    Ok(0)
}

pub(crate) async fn cmd_pause(a: NameArg, pause: bool) -> CliResult<u8> {
    let h = Sandbox::get(&a.name).await?;
    if pause {
        h.pause().await?;
    } else {
        h.resume().await?;
    }
    out(format!("{}\n", a.name).as_bytes())?;
    Ok(0)
}

pub(crate) async fn cmd_ls(a: LsArgs) -> CliResult<u8> {
    let mut filter = SandboxFilter::new().with_labels(a.labels);
    if let Some(s) = a.status {
        filter = filter.with_status(s.into());
    }
    let list = Sandbox::list_with(filter).await?;
    if a.json {
        let v = Value::Array(list.iter().map(handle_json).collect());
        return json_line(&v, true).map(|()| 0);
    }
    if a.quiet {
        let names: String = list.iter().map(|h| format!("{}\n", h.name())).collect();
        return out(names.as_bytes()).map(|()| 0);
    }
    let now = Utc::now();
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|h| {
            vec![
                h.name().to_string(),
                h.status().to_string(),
                h.created_at()
                    .map_or_else(|| "-".into(), |t| relative_time(t, now)),
                labels_text(h.labels()),
            ]
        })
        .collect();
    out(table(&["NAME", "STATUS", "CREATED", "LABELS"], &rows).as_bytes())?;
    Ok(0)
}

pub(crate) async fn cmd_inspect(a: NameArg) -> CliResult<u8> {
    let h = Sandbox::get(&a.name).await?;
    let mut v = handle_json(&h);
    v["exit_reason"] = json!(h.exit_reason());
    v["config"] = serde_json::from_str(h.config_json())
        .unwrap_or_else(|_| Value::String(h.config_json().to_string()));
    json_line(&v, true)?;
    Ok(0)
}
