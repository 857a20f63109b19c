//! Types and code shared by scm's eBPF programs and user space: the ingress packet parser, the
//! counter layout of the maps, and the names both sides look objects up by.
//!
//! Everything here is `no_std` and panic-free so that the kernel program and the host tests run
//! the very same parser.
#![warn(unreachable_pub)]
#![no_std]

#[cfg(any(test, feature = "testing"))]
extern crate alloc;

pub mod counters;
pub mod packet;
pub mod parse;
pub mod steer;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use counters::{ClassCounter, PacketClass};
pub use packet::PacketBytes;
pub use parse::{Fragment, L3, L4, Malformed, Packet, parse};

/// Name of the XDP ingress program inside the eBPF object.
pub const INGRESS_PROGRAM: &str = "scm_ingress";
