//! A worker's feeds of the shield's pinned maps: its authentication failures onto the XDP
//! blocklist (typed refusals from the proxy, see `proxy::refusals`), and the sources of the
//! connections it accepts into the verified sources (SYN-flood mode).

use std::sync::{Arc, Mutex};

use tracing::warn;

use super::args::{SupervisorArgs, WORKER_INDEX_ENV};
use super::error::lock;
use crate::{
    proxy::{AuthFailure, RefusalSink},
    steer::{
        auth_failures::{AuthFailures, BlockPolicy},
        verified::{self, VerifiedSources},
    },
};

/// In a worker (and with --block-after set), the sink that puts sources failing
/// authentication repeatedly on the XDP blocklist: the proxy hands it each authentication
/// failure as a typed value. `None` elsewhere, or when the pinned maps cannot be opened (said
/// in the log; the worker serves on without the shield).
pub fn blocklist_sink(args: &SupervisorArgs) -> Option<Arc<dyn RefusalSink>> {
    if std::env::var_os(WORKER_INDEX_ENV).is_none() || args.block_after == 0 {
        return None;
    }
    let policy = BlockPolicy {
        threshold: args.block_after,
        window: args.block_window,
        block_for: args.block_for,
    };
    match AuthFailures::open(&args.pin_dir, policy) {
        Ok(maps) => Some(Arc::new(Blocklist(Mutex::new(maps)))),
        Err(e) => {
            warn!(
                pin_dir = %args.pin_dir.display(),
                error = %e,
                "cannot open the blocklist; authentication failures will not block sources"
            );
            None
        }
    }
}

/// A worker's feed of the pinned blocklist.
#[derive(Debug)]
struct Blocklist(Mutex<AuthFailures>);

impl RefusalSink for Blocklist {
    fn auth_failure(&self, failure: AuthFailure) {
        let mut maps = lock(&self.0);
        let ip = failure.peer.ip();
        match maps.failure(ip) {
            Ok(true) => {
                let p = maps.policy();
                warn!(
                    source = %ip,
                    kind = failure.kind.code(),
                    "{ip} blocked for {:?} after {} authentication failures",
                    p.block_for,
                    p.threshold
                );
            }
            Ok(false) => {}
            Err(e) => warn!(source = %ip, error = %e, "recording an authentication failure"),
        }
    }
}

/// In a worker, makes every accepted connection mark its source verified for the SYN-flood
/// mode (see [`crate::steer::verified`]). Elsewhere nothing. A failure to open the pinned maps
/// is said on stderr (logging is not up yet) and the worker serves on.
pub fn install_verified_hook(args: &SupervisorArgs) {
    if std::env::var_os(WORKER_INDEX_ENV).is_none() {
        return;
    }
    match VerifiedSources::open(&args.pin_dir) {
        Ok(v) => {
            verified::install(v);
        }
        Err(e) => eprintln!(
            "scm-proxy worker: cannot open the verified-sources map in {} ({e}); in SYN-flood              mode this worker's devices will not be recognised",
            args.pin_dir.display()
        ),
    }
}
