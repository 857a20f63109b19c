//! Library target of the eBPF crate. It holds nothing: it exists so that `scm-proxy` can list
//! this crate as a build-dependency, which makes cargo rebuild the proxy (and so re-run the
//! eBPF build in its build.rs) when anything here changes. The programs are in `src/main.rs`.
#![no_std]
