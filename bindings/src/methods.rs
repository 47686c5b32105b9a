//! Every method of the wire (`docs/bindings.md`, "Methods"): its arguments taken field by
//! field (a missing, unknown or mistyped field is the caller's error), the SDK called, the
//! answer made a JSON value.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::StreamExt;
use microsandbox::{Sandbox, SandboxFilter, SandboxStatus};
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::config::{self, decode, ExecSpec, LogSpec, LogStreamSpec, SandboxSpec};
use crate::error::{BindError, Kind};
use crate::table::{self, Exec, Object, Stream};
use crate::{install, values, VERSION};

/// How many items a stream holds ahead of its reader.
const STREAM_AHEAD: usize = 4;

/// One call's arguments.
struct Args {
    method: String,
    map: Map<String, Value>,
}

impl Args {
    fn bad(&self, e: impl std::fmt::Display) -> BindError {
        BindError::arg(format!("{}: {e}", self.method))
    }

    /// A field that must be there.
    fn req<T: DeserializeOwned>(&mut self, key: &str) -> Result<T, BindError> {
        match self.map.remove(key) {
            Some(v) => serde_json::from_value(v).map_err(|e| self.bad(format_args!("{key}: {e}"))),
            None => Err(self.bad(format_args!("the argument {key:?} is missing"))),
        }
    }

    /// A field that may be absent or null.
    fn opt<T: DeserializeOwned>(&mut self, key: &str) -> Result<Option<T>, BindError> {
        match self.map.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v)
                .map(Some)
                .map_err(|e| self.bad(format_args!("{key}: {e}"))),
        }
    }

    fn handle(&mut self) -> Result<u64, BindError> {
        self.req("handle")
    }

    /// The fields left, as `T` (which refuses fields it does not know).
    fn rest<T: DeserializeOwned>(self) -> Result<T, BindError> {
        serde_json::from_value(Value::Object(self.map))
            .map_err(|e| BindError::arg(format!("{}: {e}", self.method)))
    }

    /// No fields may be left.
    fn done(self) -> Result<(), BindError> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(k) => Err(self.bad(format_args!("unknown argument {k:?}"))),
        }
    }
}

fn sandbox_ref(sb: Sandbox) -> Result<Value, BindError> {
    let name = sb.name().to_string();
    let owns = sb.owns_lifecycle();
    let handle = table::insert(Object::Sandbox(Arc::new(sb)))?;
    Ok(json!({"sandbox": handle, "name": name, "owns_lifecycle": owns}))
}

/// A stream fed by `produce` on its own task (which ends when the stream is released).
fn stream<F, Fut>(produce: F) -> Result<Value, BindError>
where
    F: FnOnce(mpsc::Sender<Result<Value, BindError>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(STREAM_AHEAD);
    let task = tokio::spawn(produce(tx));
    let handle = table::insert(Object::Stream(Arc::new(Stream {
        rx: tokio::sync::Mutex::new(rx),
        task,
    })))?;
    Ok(json!({ "stream": handle }))
}

fn log_stream(logs: microsandbox::LogStream) -> Result<Value, BindError> {
    stream(|tx| async move {
        let mut logs = logs;
        while let Some(item) = logs.next().await {
            let v = item.map(|e| values::log_entry(&e)).map_err(BindError::from);
            if tx.send(v).await.is_err() {
                return;
            }
        }
    })
}

fn exec_ref(mut h: microsandbox::ExecHandle) -> Result<Value, BindError> {
    let pid = h.pid();
    let exec = Exec {
        stdin: h.take_stdin(),
        control: h.control(),
        handle: tokio::sync::Mutex::new(Some(h)),
    };
    let handle = table::insert(Object::Exec(Arc::new(exec)))?;
    Ok(json!({ "exec": handle, "pid": pid }))
}

/// Takes a running command's handle out for a call that consumes it; the table entry goes.
async fn take_exec(id: u64) -> Result<microsandbox::ExecHandle, BindError> {
    let exec = table::exec(id)?;
    // Never queued behind a reader (which may wait for ever on a silent command).
    let h = exec
        .handle
        .try_lock()
        .map_err(|_| {
            BindError::new(
                Kind::Busy,
                format!("command {id} is being read by another call; try again when it returns"),
            )
        })?
        .take();
    let _ = table::release(id);
    h.ok_or_else(|| {
        BindError::new(
            Kind::InvalidHandle,
            format!("command {id} was already waited for"),
        )
    })
}

fn status_filter(s: &str) -> Result<SandboxStatus, BindError> {
    serde_json::from_value(json!(s)).map_err(|_| {
        BindError::arg(format!(
            "status {s:?}: use running, draining, paused, stopped or crashed"
        ))
    })
}

pub(crate) async fn dispatch(method: &str, map: Map<String, Value>) -> Result<Value, BindError> {
    let mut a = Args {
        method: method.to_string(),
        map,
    };
    let null = Ok(Value::Null);
    match method {
        "version" => {
            a.done()?;
            Ok(json!({ "sdk": VERSION }))
        }
        // Both look at the disk and may run dpkg-query or builds: off the runtime's threads.
        "is_installed" => {
            a.done()?;
            let missing = tokio::task::spawn_blocking(install::missing)
                .await
                .map_err(|e| BindError::new(Kind::Internal, format!("is_installed: {e}")))?;
            Ok(json!(missing.is_empty()))
        }
        "ensure_installed" => {
            a.done()?;
            tokio::task::spawn_blocking(install::ensure)
                .await
                .map_err(|e| BindError::new(Kind::Internal, format!("ensure_installed: {e}")))??;
            null
        }
        "create" | "create_with_progress" => {
            let name: String = a.req("name")?;
            let detached = a.opt::<bool>("detached")?.unwrap_or(false);
            let spec = a.opt::<Value>("config")?.unwrap_or(json!({}));
            let spec: SandboxSpec = serde_json::from_value(spec)
                .map_err(|e| BindError::arg(format!("{method}: config: {e}")))?;
            a.done()?;
            let b = spec.builder(&name)?;
            if method == "create" {
                let sb = if detached {
                    b.create_detached().await?
                } else {
                    b.create().await?
                };
                sandbox_ref(sb)
            } else {
                let session = if detached {
                    b.create_detached_with_progress()
                } else {
                    b.create_with_progress()
                };
                let h = table::insert(Object::Pull(Arc::new(tokio::sync::Mutex::new(Some(
                    session,
                )))))?;
                Ok(json!({ "pull": h }))
            }
        }
        "pull.next" => {
            let id = a.handle()?;
            a.done()?;
            let p = table::pull(id)?;
            let mut guard = p.lock().await;
            let Some(session) = guard.as_mut() else {
                return Err(BindError::new(
                    Kind::InvalidHandle,
                    format!("pull session {id} is spent"),
                ));
            };
            Ok(session
                .next_event()
                .await
                .map_or(Value::Null, |e| values::pull_event(&e)))
        }
        "pull.result" => {
            let id = a.handle()?;
            a.done()?;
            let p = table::pull(id)?;
            let session = p.lock().await.take();
            let _ = table::release(id);
            let session = session.ok_or_else(|| {
                BindError::new(Kind::InvalidHandle, format!("pull session {id} is spent"))
            })?;
            sandbox_ref(session.result().await?)
        }
        "start" => {
            let name: String = a.req("name")?;
            let detached = a.opt::<bool>("detached")?.unwrap_or(false);
            a.done()?;
            let sb = if detached {
                Sandbox::start_detached(&name).await?
            } else {
                Sandbox::start(&name).await?
            };
            sandbox_ref(sb)
        }
        "connect" => {
            let name: String = a.req("name")?;
            a.done()?;
            sandbox_ref(Sandbox::connect(&name).await?)
        }
        "get" => {
            let name: String = a.req("name")?;
            a.done()?;
            Ok(values::handle(&Sandbox::get(&name).await?))
        }
        "list" => {
            let labels: BTreeMap<String, String> = a.opt("labels")?.unwrap_or_default();
            let status: Option<String> = a.opt("status")?;
            a.done()?;
            let mut filter = SandboxFilter::new().with_labels(labels);
            if let Some(s) = status {
                filter = filter.with_status(status_filter(&s)?);
            }
            let list = Sandbox::list_with(filter).await?;
            Ok(Value::Array(list.iter().map(values::handle).collect()))
        }
        "remove" => {
            let name: String = a.req("name")?;
            a.done()?;
            Sandbox::remove(&name).await?;
            null
        }
        "all_metrics" => {
            a.done()?;
            let all = microsandbox::all_sandbox_metrics().await?;
            let map: Map<String, Value> = all
                .iter()
                .map(|(n, m)| (n.clone(), values::metrics(m)))
                .collect();
            Ok(Value::Object(map))
        }
        m if m.starts_with("handle.") => by_name(&m["handle.".len()..], a).await,
        m if m.starts_with("sandbox.") => on_sandbox(&m["sandbox.".len()..], a).await,
        m if m.starts_with("fs.") => on_fs(&m["fs.".len()..], a).await,
        m if m.starts_with("exec.") => on_exec(&m["exec.".len()..], a).await,
        m if m.starts_with("ssh.") => on_ssh(&m["ssh.".len()..], a).await,
        m if m.starts_with("snapshot.") => on_snapshot(&m["snapshot.".len()..], a).await,
        "stream.next" => {
            let id = a.handle()?;
            a.done()?;
            let s = table::stream(id)?;
            let mut rx = s.rx.lock().await;
            match rx.recv().await {
                Some(item) => item,
                None => null,
            }
        }
        "release" => {
            let id = a.handle()?;
            a.done()?;
            table::release(id)?;
            null
        }
        other => Err(BindError::arg(format!("unknown method {other:?}"))),
    }
}

/// `handle.*`: a sandbox by name, running or not.
async fn by_name(op: &str, mut a: Args) -> Result<Value, BindError> {
    let name: String = a.req("name")?;
    let timeout = match op {
        "stop" | "kill" => a
            .opt::<f64>("timeout")?
            .map(|t| config::secs("timeout", t))
            .transpose()?,
        _ => None,
    };
    let h = Sandbox::get(&name).await?;
    match op {
        "stop" => {
            a.done()?;
            match timeout {
                Some(t) => h.stop_with_timeout(t).await?,
                None => h.stop().await?,
            }
        }
        "kill" => {
            a.done()?;
            match timeout {
                Some(t) => h.kill_with_timeout(t).await?,
                None => h.kill().await?,
            }
        }
        "drain" | "request_drain" => {
            a.done()?;
            h.request_drain().await?;
        }
        "request_stop" => {
            a.done()?;
            h.request_stop().await?;
        }
        "request_kill" => {
            a.done()?;
            h.request_kill().await?;
        }
        "metrics" => {
            a.done()?;
            return Ok(values::metrics(&h.metrics().await?));
        }
        "snapshot" => {
            let snapshot: String = a.req("snapshot")?;
            a.done()?;
            return Ok(values::snapshot(&h.snapshot(&snapshot).await?));
        }
        "snapshot_to" => {
            let path: String = a.req("path")?;
            a.done()?;
            return Ok(values::snapshot(&h.snapshot_to(&path).await?));
        }
        "pause" => {
            a.done()?;
            h.pause().await?;
        }
        "resume" => {
            a.done()?;
            h.resume().await?;
        }
        "wait_until_stopped" => {
            a.done()?;
            return Ok(values::stop_result(&h.wait_until_stopped().await?));
        }
        "logs" => {
            let opts = a.rest::<LogSpec>()?.options()?;
            let logs = h.logs(&opts).await?;
            return Ok(Value::Array(logs.iter().map(values::log_entry).collect()));
        }
        "log_stream" => {
            let opts = a.rest::<LogStreamSpec>()?.options()?;
            return log_stream(h.log_stream(opts)?);
        }
        other => return Err(BindError::arg(format!("unknown method handle.{other}"))),
    }
    Ok(Value::Null)
}

/// `sandbox.*`: a live sandbox by handle.
async fn on_sandbox(op: &str, mut a: Args) -> Result<Value, BindError> {
    let id = a.handle()?;
    // The calls that consume the sandbox take it out of the table.
    match op {
        "detach" => {
            a.done()?;
            let sb = table::take_sandbox(id)?;
            // On a task of its own: a cancelled call must not drop the sandbox half way
            // (its drop would stop the VM the caller asked to keep).
            tokio::spawn(sb.detach())
                .await
                .map_err(|e| BindError::new(Kind::Internal, format!("detach: {e}")))??;
            return Ok(Value::Null);
        }
        "remove_persisted" => {
            a.done()?;
            // Refused before the sandbox is taken: taking a running owned sandbox out of
            // the table (and dropping it when the SDK refuses) would stop it.
            let name = table::sandbox(id)?.name().to_string();
            if matches!(
                Sandbox::get(&name).await?.status(),
                SandboxStatus::Running | SandboxStatus::Draining | SandboxStatus::Paused
            ) {
                return Err(microsandbox::MicrosandboxError::StillRunning(name).into());
            }
            table::take_sandbox(id)?.remove_persisted().await?;
            return Ok(Value::Null);
        }
        _ => {}
    }
    let sb = table::sandbox(id)?;
    match op {
        "info" => {
            a.done()?;
            let config = serde_json::to_value(sb.config()).unwrap_or(Value::Null);
            Ok(json!({"name": sb.name(), "owns_lifecycle": sb.owns_lifecycle(), "config": config}))
        }
        "exec" | "shell" | "exec_stream" | "shell_stream" => {
            let shell = op.starts_with("shell");
            let (cmd, args) = if shell {
                (a.req::<String>("script")?, Vec::new())
            } else {
                (
                    a.req::<String>("cmd")?,
                    a.opt::<Vec<String>>("args")?.unwrap_or_default(),
                )
            };
            let spec: ExecSpec = a.rest()?;
            let streaming = op.ends_with("_stream");
            if !streaming && spec.stdin_pipe() {
                return Err(BindError::arg(format!(
                    "sandbox.{op}: stdin_pipe is for streams (nobody could write it here)"
                )));
            }
            let opts = spec.options(args)?;
            match (shell, streaming) {
                (false, false) => Ok(values::output(&sb.exec_with(cmd, opts).await?)),
                (true, false) => Ok(values::output(&sb.shell_with(cmd, opts).await?)),
                (false, true) => exec_ref(sb.exec_stream_with(cmd, opts).await?),
                (true, true) => exec_ref(sb.shell_stream_with(cmd, opts).await?),
            }
        }
        "metrics" => {
            a.done()?;
            Ok(values::metrics(&sb.metrics().await?))
        }
        "metrics_stream" => {
            let interval = config::secs("interval", a.opt::<f64>("interval")?.unwrap_or(1.0))?;
            a.done()?;
            stream(|tx| async move {
                let s = sb.metrics_stream(interval);
                futures_util::pin_mut!(s);
                while let Some(item) = s.next().await {
                    let v = item.map(|m| values::metrics(&m)).map_err(BindError::from);
                    if tx.send(v).await.is_err() {
                        return;
                    }
                }
            })
        }
        "logs" => {
            let opts = a.rest::<LogSpec>()?.options()?;
            let logs = sb.logs(&opts).await?;
            Ok(Value::Array(logs.iter().map(values::log_entry).collect()))
        }
        "log_stream" => {
            let opts = a.rest::<LogStreamSpec>()?.options()?;
            log_stream(sb.log_stream(opts)?)
        }
        "stop" | "kill" => {
            let timeout = a
                .opt::<f64>("timeout")?
                .map(|t| config::secs("timeout", t))
                .transpose()?;
            a.done()?;
            match (op, timeout) {
                ("stop", Some(t)) => sb.stop_with_timeout(t).await?,
                ("stop", None) => sb.stop().await?,
                (_, Some(t)) => sb.kill_with_timeout(t).await?,
                (_, None) => sb.kill().await?,
            }
            Ok(Value::Null)
        }
        "stop_and_wait" => {
            a.done()?;
            Ok(values::exit(sb.stop_and_wait().await?))
        }
        "wait" => {
            a.done()?;
            Ok(values::exit(sb.wait().await?))
        }
        "drain" => {
            a.done()?;
            sb.drain().await?;
            Ok(Value::Null)
        }
        "request_stop" | "request_kill" | "request_drain" => {
            a.done()?;
            match op {
                "request_stop" => sb.request_stop().await?,
                "request_kill" => sb.request_kill().await?,
                _ => sb.request_drain().await?,
            }
            Ok(Value::Null)
        }
        "attach" | "attach_shell" => {
            let code = if op == "attach" {
                let cmd: String = a.req("cmd")?;
                let args: Vec<String> = a.opt("args")?.unwrap_or_default();
                a.done()?;
                sb.attach(cmd, args).await?
            } else {
                a.done()?;
                sb.attach_shell().await?
            };
            Ok(json!(code))
        }
        "pause" => {
            a.done()?;
            sb.pause().await?;
            Ok(Value::Null)
        }
        "resume" => {
            a.done()?;
            sb.resume().await?;
            Ok(Value::Null)
        }
        "wait_until_stopped" => {
            a.done()?;
            Ok(values::stop_result(&sb.wait_until_stopped().await?))
        }
        other => Err(BindError::arg(format!("unknown method sandbox.{other}"))),
    }
}

/// `fs.*`: files of a live sandbox.
async fn on_fs(op: &str, mut a: Args) -> Result<Value, BindError> {
    let sb = table::sandbox(a.handle()?)?;
    let fs = sb.fs();
    let null = Value::Null;
    let v = match op {
        "rename" | "copy" | "copy_from_host" | "copy_to_host" => {
            let from: String = a.req("from")?;
            let to: String = a.req("to")?;
            a.done()?;
            match op {
                "rename" => fs.rename(&from, &to).await?,
                "copy" => fs.copy(&from, &to).await?,
                "copy_from_host" => fs.copy_from_host(&from, &to).await?,
                _ => fs.copy_to_host(&from, &to).await?,
            }
            null
        }
        _ => {
            let path: String = a.req("path")?;
            let data = match op {
                "write" => Some(decode("data_b64", &a.req::<String>("data_b64")?)?),
                _ => None,
            };
            a.done()?;
            match (op, data) {
                ("write", Some(d)) => {
                    fs.write(&path, d).await?;
                    null
                }
                ("read", _) => json!({ "data_b64": values::b64(&fs.read(&path).await?) }),
                ("list", _) => {
                    Value::Array(fs.list(&path).await?.iter().map(values::fs_entry).collect())
                }
                ("stat", _) => values::fs_metadata(&fs.stat(&path).await?),
                ("exists", _) => json!(fs.exists(&path).await?),
                ("mkdir", _) => {
                    fs.mkdir(&path).await?;
                    null
                }
                ("mkdir_all", _) => {
                    fs.mkdir_all(&path).await?;
                    null
                }
                ("remove", _) => {
                    fs.remove(&path).await?;
                    null
                }
                ("remove_dir", _) => {
                    fs.remove_dir(&path).await?;
                    null
                }
                (other, _) => return Err(BindError::arg(format!("unknown method fs.{other}"))),
            }
        }
    };
    Ok(v)
}

/// `exec.*`: a running command.
async fn on_exec(op: &str, mut a: Args) -> Result<Value, BindError> {
    let id = a.handle()?;
    match op {
        "wait" => {
            a.done()?;
            return Ok(values::status(&take_exec(id).await?.wait().await?));
        }
        "collect" => {
            a.done()?;
            return Ok(values::output(&take_exec(id).await?.collect().await?));
        }
        _ => {}
    }
    let exec = table::exec(id)?;
    let no_pipe = || {
        BindError::arg(format!(
            "exec.{op}: command {id}'s stdin is not a pipe (start it with stdin_pipe)"
        ))
    };
    match op {
        "recv" => {
            a.done()?;
            let mut guard = exec.handle.lock().await;
            let h = guard.as_mut().ok_or_else(|| {
                BindError::new(
                    Kind::InvalidHandle,
                    format!("command {id} was already waited for"),
                )
            })?;
            Ok(h.recv()
                .await?
                .map_or(Value::Null, |e| values::exec_event(&e)))
        }
        "write" => {
            let data = decode("data_b64", &a.req::<String>("data_b64")?)?;
            a.done()?;
            exec.stdin.as_ref().ok_or_else(no_pipe)?.write(data).await?;
            Ok(Value::Null)
        }
        "close_stdin" => {
            a.done()?;
            exec.stdin.as_ref().ok_or_else(no_pipe)?.close().await?;
            Ok(Value::Null)
        }
        "signal" => {
            let signal: i32 = a.req("signal")?;
            a.done()?;
            exec.control.signal(signal).await?;
            Ok(Value::Null)
        }
        "kill" => {
            a.done()?;
            exec.control.kill().await?;
            Ok(Value::Null)
        }
        "resize" => {
            let rows: u16 = a.req("rows")?;
            let cols: u16 = a.req("cols")?;
            a.done()?;
            exec.control.resize(rows, cols).await?;
            Ok(Value::Null)
        }
        other => Err(BindError::arg(format!("unknown method exec.{other}"))),
    }
}

fn ssh_key(text: &str) -> Result<microsandbox::russh::keys::PublicKey, BindError> {
    microsandbox::russh::keys::PublicKey::from_openssh(text.trim())
        .map_err(|e| BindError::arg(format!("not an OpenSSH public key: {e}")))
}

fn ssh_output(o: &microsandbox::SshOutput) -> Value {
    json!({
        "stdout_b64": values::b64(&o.stdout),
        "stderr_b64": values::b64(&o.stderr),
        "exit_status": o.exit_status,
        "exit_signal": o.exit_signal,
    })
}

fn ssh_client_ref(c: microsandbox::SshClient) -> Result<Value, BindError> {
    Ok(json!({ "client": table::insert(Object::SshClient(Arc::new(c)))? }))
}

/// `ssh.*`: SSH endpoints of a sandbox and in-process SSH clients.
async fn on_ssh(op: &str, mut a: Args) -> Result<Value, BindError> {
    let id = a.handle()?;
    match op {
        "serve" => {
            let port: u16 = a.opt("port")?.unwrap_or(0);
            let keys: Vec<String> = a.opt("authorized_keys")?.unwrap_or_default();
            a.done()?;
            let sb = table::sandbox(id)?;
            let mut opts = microsandbox::SshOptions::new().port(port);
            for k in &keys {
                opts = opts.authorized_key(ssh_key(k)?);
            }
            let ep = sb.ssh_server(opts).await?;
            let info = json!({
                "addr": ep.addr().to_string(),
                "port": ep.port(),
                "host_key": ep.host_key().to_openssh().unwrap_or_default(),
                "fingerprint": ep.fingerprint(),
                "known_hosts_line": ep.known_hosts_line(),
            });
            let handle = table::insert(Object::Ssh(Arc::new(ep)))?;
            let mut v = info;
            v["endpoint"] = json!(handle);
            Ok(v)
        }
        "open_client" => {
            a.done()?;
            ssh_client_ref(table::sandbox(id)?.open_client().await?)
        }
        "authorize" => {
            let key = ssh_key(&a.req::<String>("key")?)?;
            a.done()?;
            table::ssh(id)?.authorize(key)?;
            Ok(Value::Null)
        }
        "endpoint_client" => {
            let user = a.opt::<String>("user")?.unwrap_or_else(|| "root".into());
            a.done()?;
            ssh_client_ref(table::ssh(id)?.open_client(&user).await?)
        }
        "shutdown" => {
            a.done()?;
            table::take_ssh(id)?.shutdown().await;
            Ok(Value::Null)
        }
        "exec" => {
            let command: String = a.req("command")?;
            a.done()?;
            Ok(ssh_output(&table::ssh_client(id)?.exec(&command).await?))
        }
        "close" => {
            a.done()?;
            table::take_ssh_client(id)?.close().await?;
            Ok(Value::Null)
        }
        other => Err(BindError::arg(format!("unknown method ssh.{other}"))),
    }
}

/// `snapshot.*`: snapshot artifacts under `$MSB_HOME/snapshots` (or at a path).
async fn on_snapshot(op: &str, mut a: Args) -> Result<Value, BindError> {
    use microsandbox::{ExportOptions, Snapshot};
    match op {
        "list" => {
            a.done()?;
            let list = Snapshot::list().await?;
            Ok(Value::Array(list.iter().map(values::snapshot).collect()))
        }
        "get" | "remove" => {
            let name: String = a.req("name")?;
            a.done()?;
            if op == "get" {
                Ok(values::snapshot(&Snapshot::get(&name).await?))
            } else {
                Snapshot::remove(&name).await?;
                Ok(Value::Null)
            }
        }
        "export" => {
            let name: String = a.req("name")?;
            let path: String = a.req("path")?;
            let with_image = a.opt::<bool>("with_image")?.unwrap_or(false);
            a.done()?;
            Snapshot::export(&name, &path, ExportOptions { with_image }).await?;
            Ok(Value::Null)
        }
        "import" => {
            let path: String = a.req("path")?;
            let name: Option<String> = a.opt("name")?;
            a.done()?;
            Ok(values::snapshot(
                &Snapshot::import(&path, name.as_deref()).await?,
            ))
        }
        other => Err(BindError::arg(format!("unknown method snapshot.{other}"))),
    }
}
