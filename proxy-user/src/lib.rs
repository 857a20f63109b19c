//! scm proxy.
