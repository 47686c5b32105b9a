//! A hook every thread the devices start calls first, with its name: the VMM installs its
//! syscall filter for that kind of thread there (see `msb_vmm::seccomp`), before the
//! thread touches anything the guest controls.

use std::sync::OnceLock;

static HOOK: OnceLock<fn(&str)> = OnceLock::new();

/// Sets the hook (once per process; later calls are ignored).
pub fn set_start_hook(hook: fn(&str)) {
    let _ = HOOK.set(hook);
}

/// Called by a thread as it starts, with its name.
pub fn started(name: &str) {
    if let Some(hook) = HOOK.get() {
        hook(name);
    }
}
