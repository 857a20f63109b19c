//! The server's clock for expiries and counters, and the poison-tolerant lock its in-memory
//! tables share.

use std::sync::Mutex;

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Takes `m`'s lock, ignoring poisoning: a panic while holding one of the in-memory tables' locks
/// leaves consistent data (every update is a single insert or remove), so the server goes on.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
