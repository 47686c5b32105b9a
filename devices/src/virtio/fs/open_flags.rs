//! The flags each open handle was opened with, so that a read or a write never asks the
//! passthrough filesystem to change a host descriptor's status flags.
//!
//! fuse-backend-rs 0.14's `PassthroughFs::read` and `write` apply the request's `flags` to
//! the handle's host descriptor with `fcntl(F_SETFL)` when they differ from the flags it
//! was opened with, on a `File` made from that raw descriptor; when the `fcntl` fails
//! (`O_DIRECT` on a directory or on a filesystem without direct I/O, `O_NOATIME` on a file
//! the VMM does not own, clearing `O_APPEND` on an append-only file) the early return drops
//! that `File` and closes the descriptor the handle still holds. The handle then reads,
//! writes and finally closes whatever the VMM opens next under that number: another
//! share's file, a vsock socket. (Found by the `fuse` fuzz target: a guest's READ on a
//! directory handle with `O_DIRECT`.)
//!
//! [`Guard`](super::guard::Guard) passes every read and write the flags its handle was
//! opened with, which never differ from what the passthrough filesystem recorded, so it
//! never calls `fcntl`. The Linux driver sends a file's `f_flags` on open and on each read
//! and write alike; what is lost is only a guest's `fcntl(F_SETFL)` after open, which no
//! longer reaches the host descriptor.

use std::collections::HashMap;
use std::sync::Mutex;

/// Open handles and their open flags.
#[derive(Debug, Default)]
pub struct OpenFlags(Mutex<HashMap<u64, u32>>);

impl OpenFlags {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u32>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `handle` (if the filesystem returned one) was opened with `flags`.
    pub fn opened(&self, handle: Option<u64>, flags: u32) {
        if let Some(h) = handle {
            self.map().insert(h, flags);
        }
    }

    /// `handle` was released.
    pub fn closed(&self, handle: u64) {
        self.map().remove(&handle);
    }

    /// The flags to read or write `handle` with: those it was opened with; `requested` for a
    /// handle never opened here (the filesystem refuses it before looking at flags).
    pub fn of(&self, handle: u64, requested: u32) -> u32 {
        self.map().get(&handle).copied().unwrap_or(requested)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_keep_their_open_flags_until_released() {
        let f = OpenFlags::default();
        f.opened(Some(3), libc::O_RDWR as u32);
        f.opened(None, libc::O_WRONLY as u32);
        assert_eq!(f.of(3, libc::O_DIRECT as u32), libc::O_RDWR as u32);
        assert_eq!(f.of(4, 7), 7);
        f.closed(3);
        assert_eq!(f.of(3, 9), 9);
    }
}
