//! Starting a plain command with `posix_spawn`, which glibc runs as
//! `clone(CLONE_VM | CLONE_VFORK)`: the agent's page tables are not copied and its memory
//! does not turn copy-on-write under its other threads. std's `Command` falls back to
//! `fork` whenever the working directory or `PATH` is set (both always are here), and a
//! fork of the agent is the most expensive thing an exec does where guest kernel code is
//! emulated (the exec bench's "call -> Started"). Commands that need work between fork and
//! exec (another user, rlimits, a terminal, the restricted profile) still go through
//! `Command`.

use std::ffi::{CString, NulError};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A command ready to spawn: program, arguments, the whole environment, directory.
pub(crate) struct Plain<'a> {
    /// As requested: a path (with a slash) or a name looked up in the env's `PATH`.
    pub program: &'a str,
    /// Arguments after the program name.
    pub args: &'a [String],
    /// The complete environment, in order, no duplicate names.
    pub env: &'a [(String, String)],
    /// Working directory.
    pub cwd: &'a str,
    /// Give the child a pipe as stdin (else `/dev/null`).
    pub stdin_pipe: bool,
}

/// A started child, in a process group of its own, with our ends of its pipes.
pub(crate) struct Spawned {
    pub pid: i32,
    pub stdin: Option<File>,
    pub stdout: File,
    pub stderr: File,
}

/// Why a spawn failed.
#[derive(Debug)]
pub(crate) enum SpawnError {
    /// A program, argument or variable holds a NUL byte.
    Nul(NulError),
    /// No executable of that name on `PATH`.
    NotFound,
    /// What the system said (the exec's own error included: glibc reports it).
    Io(std::io::Error),
}

impl From<NulError> for SpawnError {
    fn from(e: NulError) -> Self {
        SpawnError::Nul(e)
    }
}

impl From<std::io::Error> for SpawnError {
    fn from(e: std::io::Error) -> Self {
        SpawnError::Io(e)
    }
}

/// Where `execvp` would find `program`: as given when it has a slash (relative to the
/// child's directory), else the first executable regular file in `path`'s directories
/// (an empty entry is the directory itself, relative entries are taken from `cwd`). A
/// match that is not executable is kept as the answer when nothing better turns up, so
/// the exec reports "permission denied" as execvp would.
pub(crate) fn resolve(program: &str, path: &str, cwd: &Path) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    if program.is_empty() {
        return None;
    }
    let mut denied = None;
    for dir in path.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = cwd.join(dir).join(program);
        match std::fs::metadata(&candidate) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => return Some(candidate),
            Ok(m) if m.is_file() => {
                denied.get_or_insert(candidate);
            }
            _ => {}
        }
    }
    denied
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    match rc {
        0 => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}

/// A pipe whose both ends close on exec: (read, write).
fn pipe() -> std::io::Result<(File, File)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok((File::from(r), File::from(w)))
}

/// `posix_spawn` attributes and file actions, destroyed when dropped.
struct Attrs {
    attr: libc::posix_spawnattr_t,
    actions: libc::posix_spawn_file_actions_t,
}

impl Attrs {
    fn new() -> std::io::Result<Box<Attrs>> {
        // SAFETY: both are plain C structs that the init calls below fill in before use;
        // all-zero is a valid bit pattern for them.
        let mut a: Box<Attrs> = Box::new(unsafe { std::mem::zeroed() });
        // SAFETY: initialising structs we own; on failure nothing needs destroying.
        check(unsafe { libc::posix_spawnattr_init(&mut a.attr) })?;
        // SAFETY: as above.
        if let Err(e) = check(unsafe { libc::posix_spawn_file_actions_init(&mut a.actions) }) {
            // SAFETY: `attr` was initialised just above.
            unsafe { libc::posix_spawnattr_destroy(&mut a.attr) };
            return Err(e);
        }
        Ok(a)
    }
}

impl Drop for Attrs {
    fn drop(&mut self) {
        // SAFETY: both were initialised in `new` and are destroyed once, here.
        unsafe {
            libc::posix_spawn_file_actions_destroy(&mut self.actions);
            libc::posix_spawnattr_destroy(&mut self.attr);
        }
    }
}

/// Spawns `cmd` in a process group of its own, signals unblocked and at their defaults,
/// stdout and stderr on new pipes, stdin on a pipe or `/dev/null`.
pub(crate) fn spawn(cmd: &Plain) -> Result<Spawned, SpawnError> {
    let path_var = cmd
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map_or("", |(_, v)| v.as_str());
    let mut argv = vec![CString::new(cmd.program)?];
    let program = resolve(cmd.program, path_var, Path::new(cmd.cwd)).ok_or(SpawnError::NotFound)?;
    let program = CString::new(program.into_os_string().into_encoded_bytes())?;
    for a in cmd.args {
        argv.push(CString::new(a.as_str())?);
    }
    let envp = cmd
        .env
        .iter()
        .map(|(k, v)| CString::new(format!("{k}={v}")))
        .collect::<Result<Vec<_>, _>>()?;
    let cwd = CString::new(cmd.cwd)?;
    let dev_null = CString::new("/dev/null")?;
    let argv_ptrs = nul_terminated(&argv);
    let envp_ptrs = nul_terminated(&envp);

    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let stdin = if cmd.stdin_pipe { Some(pipe()?) } else { None };

    let mut a = Attrs::new()?;
    let flags =
        libc::POSIX_SPAWN_SETPGROUP | libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF;
    // SAFETY: every call below works on the initialised attribute and action objects in
    // `a` and on signal sets on our stack; the paths are NUL-terminated strings that live
    // until after the spawn; the fds are ours and open.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigfillset(&mut all);
        check(libc::posix_spawnattr_setflags(
            &mut a.attr,
            flags as libc::c_short,
        ))?;
        check(libc::posix_spawnattr_setpgroup(&mut a.attr, 0))?;
        // The agent ignores SIGPIPE and its threads may block signals: the child starts
        // clean.
        check(libc::posix_spawnattr_setsigmask(&mut a.attr, &empty))?;
        check(libc::posix_spawnattr_setsigdefault(&mut a.attr, &all))?;
        match &stdin {
            Some((r, _)) => check(libc::posix_spawn_file_actions_adddup2(
                &mut a.actions,
                r.as_raw_fd(),
                0,
            ))?,
            None => check(libc::posix_spawn_file_actions_addopen(
                &mut a.actions,
                0,
                dev_null.as_ptr(),
                libc::O_RDONLY,
                0,
            ))?,
        }
        check(libc::posix_spawn_file_actions_adddup2(
            &mut a.actions,
            out_w.as_raw_fd(),
            1,
        ))?;
        check(libc::posix_spawn_file_actions_adddup2(
            &mut a.actions,
            err_w.as_raw_fd(),
            2,
        ))?;
        check(libc::posix_spawn_file_actions_addchdir_np(
            &mut a.actions,
            cwd.as_ptr(),
        ))?;
    }
    let run = |program: &CString, argv: &[*mut libc::c_char]| {
        let mut pid: libc::pid_t = 0;
        // SAFETY: `program`, `argv` and `envp_ptrs` are NUL-terminated and point into
        // CStrings alive for the whole call; `a` is initialised; glibc's posix_spawn waits
        // for the child's exec (CLONE_VFORK) and returns its error, reaping a child that
        // failed.
        check(unsafe {
            libc::posix_spawn(
                &mut pid,
                program.as_ptr(),
                &a.actions,
                &a.attr,
                argv.as_ptr(),
                envp_ptrs.as_ptr(),
            )
        })
        .map(|()| pid)
    };
    let pid = match run(&program, &argv_ptrs) {
        // A script without `#!`: run by the shell, as execvp does.
        Err(e) if e.raw_os_error() == Some(libc::ENOEXEC) => {
            let shell = CString::new("/bin/sh")?;
            let mut sh_argv = vec![shell.clone(), program.clone()];
            sh_argv.extend(argv.iter().skip(1).cloned());
            run(&shell, &nul_terminated(&sh_argv))?
        }
        other => other?,
    };
    // The child's ends close here; ours stay.
    drop((out_w, err_w));
    Ok(Spawned {
        pid,
        stdin: stdin.map(|(_, w)| w),
        stdout: out_r,
        stderr: err_r,
    })
}

/// Pointers to `strings` followed by a null pointer, as `execve` takes them.
fn nul_terminated(strings: &[CString]) -> Vec<*mut libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr().cast_mut())
        .chain(std::iter::once(std::ptr::null_mut()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn env(path: &str) -> Vec<(String, String)> {
        vec![
            ("PATH".into(), path.into()),
            ("GREETING".into(), "hi".into()),
        ]
    }

    fn wait(pid: i32) -> i32 {
        match nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).expect("test setup") {
            nix::sys::wait::WaitStatus::Exited(_, code) => code,
            other => panic!("{other:?}"),
        }
    }

    /// Runs `program` from `/` with stdin on /dev/null: (pid, exit code, stdout).
    fn run_to_end(program: &str, args: &[String], env: &[(String, String)]) -> (i32, i32, String) {
        let mut s = spawn(&Plain {
            program,
            args,
            env,
            cwd: "/",
            stdin_pipe: false,
        })
        .expect("spawns");
        let mut out = String::new();
        s.stdout.read_to_string(&mut out).expect("test setup");
        (s.pid, wait(s.pid), out)
    }

    #[test]
    fn finds_programs_as_execvp_does() {
        let dir = tempfile::tempdir().expect("test setup");
        let (exe, plain) = (dir.path().join("tool"), dir.path().join("data"));
        std::fs::write(&exe, "#!/bin/sh\n").expect("test setup");
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("test setup");
        std::fs::write(&plain, "").expect("test setup");
        let d = dir.path().to_str().expect("test setup");
        assert_eq!(
            resolve("tool", &format!("/nonexistent:{d}"), Path::new("/")),
            Some(exe.clone())
        );
        // Found but not executable: kept, so the exec says "permission denied".
        assert_eq!(resolve("data", d, Path::new("/")), Some(plain));
        assert_eq!(resolve("missing", d, Path::new("/")), None);
        assert_eq!(resolve("", d, Path::new("/")), None);
        // A relative PATH entry is taken from the child's directory.
        assert_eq!(
            resolve("tool", ".", dir.path()),
            Some(dir.path().join(".").join("tool"))
        );
        assert_eq!(
            resolve("./x", "", Path::new("/")),
            Some(PathBuf::from("./x"))
        );
    }

    #[test]
    fn runs_with_the_environment_directory_and_pipes_given() {
        let dir = tempfile::tempdir().expect("test setup");
        let env = env("/usr/bin:/bin");
        let args = [
            "-c".to_string(),
            "pwd; echo $GREETING; read l; echo got $l >&2; exit 3".into(),
        ];
        let mut s = spawn(&Plain {
            program: "sh",
            args: &args,
            env: &env,
            cwd: dir.path().to_str().expect("test setup"),
            stdin_pipe: true,
        })
        .expect("spawns");
        s.stdin
            .take()
            .expect("test setup")
            .write_all(b"line\n")
            .expect("test setup");
        let (mut out, mut err) = (String::new(), String::new());
        s.stdout.read_to_string(&mut out).expect("test setup");
        s.stderr.read_to_string(&mut err).expect("test setup");
        assert_eq!(wait(s.pid), 3);
        let real = dir.path().canonicalize().expect("test setup");
        assert_eq!(out, format!("{}\nhi\n", real.display()));
        assert_eq!(err, "got line\n");
        // A process group of its own.
        assert_ne!(s.pid, 0);
    }

    #[test]
    fn stdin_is_dev_null_and_the_group_is_the_child() {
        let env = env("/usr/bin:/bin");
        let args = ["-c".to_string(), "cat; ps -o pgid= -p $$".into()];
        let (pid, code, out) = run_to_end("sh", &args, &env);
        assert_eq!(code, 0);
        if let Ok(pgid) = out.trim().parse::<i32>() {
            assert_eq!(pgid, pid);
        }
    }

    #[test]
    fn a_script_without_an_interpreter_line_runs_in_the_shell() {
        let dir = tempfile::tempdir().expect("test setup");
        let script = dir.path().join("plain");
        std::fs::write(&script, "echo from the shell \"$1\"\n").expect("test setup");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
            .expect("test setup");
        let env = env(&format!("{}:/usr/bin:/bin", dir.path().display()));
        let args = ["arg".to_string()];
        let (_, code, out) = run_to_end("plain", &args, &env);
        assert_eq!(code, 0);
        assert_eq!(out, "from the shell arg\n");
    }

    #[test]
    fn missing_programs_and_directories_are_errors() {
        let env = env("/usr/bin:/bin");
        let plain = |program, cwd| Plain {
            program,
            args: &[],
            env: &env,
            cwd,
            stdin_pipe: false,
        };
        assert!(matches!(
            spawn(&plain("no-such-program", "/")),
            Err(SpawnError::NotFound)
        ));
        match spawn(&plain("/no/such/program", "/")) {
            Err(SpawnError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
            other => panic!("{:?}", other.map(|s| s.pid)),
        }
        match spawn(&plain("true", "/no/such/dir")) {
            Err(SpawnError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
            other => panic!("{:?}", other.map(|s| s.pid)),
        }
        assert!(matches!(
            spawn(&plain("tr\0ue", "/")),
            Err(SpawnError::Nul(_))
        ));
    }
}
