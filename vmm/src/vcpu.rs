//! vCPU threads: each runs `KVM_RUN` in a loop, driven by an explicit state machine
//! (running, paused, exited) over a command channel. The handle joins its thread on drop.
//!
//! A thread blocked in `KVM_RUN` is woken by a real-time signal (the "kick"); the signal's
//! handler does nothing, its only effect is that `KVM_RUN` returns `EINTR` and the loop
//! looks at its commands.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::hypervisor::{ExitHandler, HypervisorError, HypervisorVcpu, VcpuRun};

/// Where a vCPU is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    /// Running guest code (or blocked in the hypervisor on its behalf).
    Running,
    /// Parked until resumed.
    Paused,
    /// The thread has ended.
    Exited,
}

/// Commands to a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuCommand {
    /// Stop running guest code until `Resume`.
    Pause,
    /// Continue after `Pause`.
    Resume,
    /// End the thread.
    Exit,
}

impl VcpuCommand {
    /// The state a thread is in once it has carried the command out.
    pub fn target(self) -> VcpuState {
        match self {
            VcpuCommand::Pause => VcpuState::Paused,
            VcpuCommand::Resume => VcpuState::Running,
            VcpuCommand::Exit => VcpuState::Exited,
        }
    }
}

/// Why a vCPU thread ended on its own (reported to the VM's event channel).
#[derive(Debug)]
pub enum VcpuEnd {
    /// The guest reset, powered off or halted for good.
    Stopped(VcpuRun),
    /// The hypervisor failed.
    Error(HypervisorError),
}

/// Errors managing vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] std::io::Error),
    /// The thread could not be spawned.
    #[error("cannot spawn the thread of vCPU {id}")]
    Spawn {
        /// vCPU id.
        id: u8,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| VcpuError::Signal(std::io::Error::from_raw_os_error(e.errno())));
    });
    result
}

type SharedState = Arc<(Mutex<VcpuState>, Condvar)>;

fn set_state(state: &SharedState, s: VcpuState) {
    *state.0.lock().unwrap_or_else(|p| p.into_inner()) = s;
    state.1.notify_all();
}

/// A running vCPU thread.
pub struct VcpuHandle {
    id: u8,
    commands: Sender<VcpuCommand>,
    state: SharedState,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for VcpuHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuHandle")
            .field("id", &self.id)
            .field("state", &self.state())
            .finish()
    }
}

/// Spawns the thread of vCPU `id`. When the guest stops the vCPU on its own, `on_end` is
/// called once from the thread.
pub fn spawn(
    id: u8,
    mut vcpu: Box<dyn HypervisorVcpu>,
    exits: Arc<dyn ExitHandler + Send>,
    on_end: Box<dyn FnOnce(u8, VcpuEnd) + Send>,
) -> Result<VcpuHandle, VcpuError> {
    install_kick_handler()?;
    let (tx, rx) = channel();
    let state: SharedState = Arc::new((Mutex::new(VcpuState::Running), Condvar::new()));
    let thread_state = state.clone();
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || {
            msb_devices::threads::started("vcpu");
            let end = run_loop(&mut *vcpu, &*exits, &rx, &thread_state);
            set_state(&thread_state, VcpuState::Exited);
            if let Some(end) = end {
                on_end(id, end);
            }
        })
        .map_err(|source| VcpuError::Spawn { id, source })?;
    Ok(VcpuHandle {
        id,
        commands: tx,
        state,
        thread: Some(thread),
    })
}

/// The vCPU loop. Returns `Some` when the guest (or the hypervisor) ended it, `None` when
/// the VMM asked it to exit.
fn run_loop(
    vcpu: &mut dyn HypervisorVcpu,
    exits: &dyn ExitHandler,
    commands: &Receiver<VcpuCommand>,
    state: &SharedState,
) -> Option<VcpuEnd> {
    let mut paused = false;
    loop {
        // Commands first; while paused, block on them.
        loop {
            let cmd = if paused {
                commands.recv().ok()
            } else {
                commands.try_recv().ok()
            };
            match cmd {
                Some(VcpuCommand::Exit) => return None,
                Some(VcpuCommand::Pause) => {
                    paused = true;
                    set_state(state, VcpuState::Paused);
                }
                Some(VcpuCommand::Resume) => {
                    paused = false;
                    set_state(state, VcpuState::Running);
                }
                // Disconnected while paused: the handle is gone, end the thread.
                None if paused => return None,
                None => break,
            }
        }
        match vcpu.run(exits) {
            Ok(VcpuRun::Handled | VcpuRun::Interrupted) => {}
            Ok(other) => return Some(VcpuEnd::Stopped(other)),
            Err(e) => return Some(VcpuEnd::Error(e)),
        }
    }
}

impl VcpuHandle {
    /// The vCPU's id.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The thread's current state.
    pub fn state(&self) -> VcpuState {
        *self.state.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends a command and kicks the thread out of the guest so it sees it.
    pub fn send(&self, cmd: VcpuCommand) {
        // A send fails only when the thread has ended, which is what Exit wants anyway.
        let _ = self.commands.send(cmd);
        self.kick();
    }

    /// Waits until the thread reaches `want` or `timeout` passes; returns the state.
    pub fn wait_for(&self, want: VcpuState, timeout: Duration) -> VcpuState {
        let guard = self.state.0.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = self
            .state
            .1
            .wait_timeout_while(guard, timeout, |s| *s != want && *s != VcpuState::Exited)
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }

    /// Waits until the thread has carried out `cmd` (sent already) or `deadline` passes,
    /// kicking it every 10 ms; returns the state reached.
    pub fn wait_kicking(&self, cmd: VcpuCommand, deadline: std::time::Instant) -> VcpuState {
        let want = cmd.target();
        loop {
            let slice = deadline
                .saturating_duration_since(std::time::Instant::now())
                .min(Duration::from_millis(10));
            let now = self.wait_for(want, slice);
            if now == want || now == VcpuState::Exited || slice.is_zero() {
                return now;
            }
            self.kick();
        }
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            if !t.is_finished() {
                // ESRCH only means the thread is already gone.
                let _ = t.kill(kick_signal());
            }
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        let _ = self.commands.send(VcpuCommand::Exit);
        // Kick until the thread notices: a signal that lands just before it enters the
        // guest is lost, so one kick is not enough.
        for _ in 0..2000 {
            match &self.thread {
                Some(t) if !t.is_finished() => {
                    self.kick();
                    std::thread::sleep(Duration::from_millis(1));
                }
                _ => break,
            }
        }
        if let Some(t) = self.thread.take() {
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::error!("vCPU {} did not stop; leaving its thread behind", self.id);
            }
        }
    }
}
