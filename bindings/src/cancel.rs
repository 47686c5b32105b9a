//! Cancel tokens of the C ABI: a Go `context.Context` that is done fires its call's token.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use tokio::sync::Notify;

/// How many tokens may be live at once (one per call in flight; a caller that never frees
/// them gets 0, "not cancellable", past this).
const MAX_TOKENS: usize = 1 << 16;

/// One token: fired once, seen by every waiter, before or after it fires.
#[derive(Debug, Default)]
pub(crate) struct Token {
    fired: AtomicBool,
    notify: Notify,
}

impl Token {
    /// Returns once the token has fired.
    pub(crate) async fn fired(&self) {
        loop {
            let notified = self.notify.notified();
            if self.fired.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }
}

fn tokens() -> MutexGuard<'static, HashMap<u64, Arc<Token>>> {
    static TOKENS: LazyLock<Mutex<HashMap<u64, Arc<Token>>>> = LazyLock::new(Mutex::default);
    TOKENS.lock().unwrap_or_else(|p| p.into_inner())
}

/// A new token, never 0 (0 when [`MAX_TOKENS`] are live).
pub fn cancel_new() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let mut t = tokens();
    if t.len() >= MAX_TOKENS {
        return 0;
    }
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    t.insert(id, Arc::default());
    id
}

/// Fires token `id` (unknown ids are ignored).
pub fn cancel(id: u64) {
    if let Some(token) = tokens().get(&id) {
        token.fire();
    }
}

/// Forgets token `id`.
pub fn cancel_free(id: u64) {
    tokens().remove(&id);
}

pub(crate) fn lookup(id: u64) -> Option<Arc<Token>> {
    if id == 0 {
        return None;
    }
    tokens().get(&id).cloned()
}
