//! scm proxy.

pub mod proxy;
