//! scm's proxy: device TLS termination, session checks, relaying, and the loader of the eBPF
//! data plane.
#![warn(unreachable_pub)]

pub mod proxy;
pub mod steer;
pub mod supervisor;
pub mod worker_env;
pub mod xdp;
