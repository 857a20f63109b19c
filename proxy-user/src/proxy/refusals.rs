//! The proxy's refusal decisions as typed values, for whoever acts on them: under a supervisor,
//! each worker hands its authentication failures to the XDP blocklist (`supervisor/shield.rs`).
//!
//! Nothing here goes through `tracing`: the log line a refusal also writes may be reworded,
//! filtered out or compiled out without the blocklist noticing.

use std::net::SocketAddr;

use scm_proto::preamble::Status;

/// The refusals a device with valid credentials never causes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AuthFailureKind {
    /// An unknown, expired, revoked or malformed session id (`session_invalid`).
    SessionInvalid,
    /// A session id used on another TLS connection than its own (`binding_failed`).
    BindingFailed,
}

impl AuthFailureKind {
    /// The kind of authentication failure a refusal with `status` is; `None` for every other
    /// refusal (a garbled or cut-short preamble, a policy refusal, back-end trouble): a device
    /// closing a connection early is no attack.
    pub fn of(status: Status) -> Option<Self> {
        match status {
            Status::SessionInvalid => Some(Self::SessionInvalid),
            Status::BindingFailed => Some(Self::BindingFailed),
            _ => None,
        }
    }

    /// The reply status code the device was sent.
    pub fn code(self) -> &'static str {
        match self {
            Self::SessionInvalid => Status::SessionInvalid.code(),
            Self::BindingFailed => Status::BindingFailed.code(),
        }
    }
}

/// One authentication failure: who, and which.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthFailure {
    /// The device's address as the proxy accepted it.
    pub peer: SocketAddr,
    /// Which check failed.
    pub kind: AuthFailureKind,
}

/// Receives the proxy's refusal decisions. Called on the connection's task, right after the
/// decision and before the reply is written, so it must be quick (a map update, a channel send).
pub trait RefusalSink: Send + Sync + 'static {
    /// An authentication failure was just refused.
    fn auth_failure(&self, failure: AuthFailure);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_session_and_binding_refusals_are_authentication_failures() {
        assert_eq!(
            AuthFailureKind::of(Status::SessionInvalid),
            Some(AuthFailureKind::SessionInvalid)
        );
        assert_eq!(
            AuthFailureKind::of(Status::BindingFailed),
            Some(AuthFailureKind::BindingFailed)
        );
        for s in [
            Status::Ok,
            Status::BadPreamble,
            Status::AppRefused,
            Status::UnknownResource,
            Status::Forbidden,
            Status::Internal,
            Status::RateLimited,
            Status::SecurityUnavailable,
            Status::BackendUnavailable,
        ] {
            assert_eq!(AuthFailureKind::of(s), None, "{s}");
        }
        assert_eq!(AuthFailureKind::SessionInvalid.code(), "session_invalid");
        assert_eq!(AuthFailureKind::BindingFailed.code(), "binding_failed");
    }
}
