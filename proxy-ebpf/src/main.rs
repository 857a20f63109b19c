//! scm's kernel programs: the XDP ingress program (parse, count, shield, steer) and the
//! sk_lookup program that delivers each new connection to the chosen worker.
//!
//! The programs are thin on purpose: parsing lives in `proxy-common` (host-tested), and the
//! decision on a frame is one function, `steer::verdict`.
#![no_std]
#![no_main]

mod frame;
mod steer;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use frame::XdpFrame;
use proxy_common::{ClassCounter, Malformed, PacketBytes, PacketClass, parse, parse::classify};

/// Packets and bytes per [`PacketClass`]; per CPU so counting needs no atomics.
/// User space finds it by `proxy_common::counters::CLASS_STATS_MAP`.
#[map]
static SCM_CLASS_STATS: PerCpuArray<ClassCounter> =
    PerCpuArray::with_max_entries(PacketClass::COUNT, 0);

/// Malformed packets per [`Malformed`] reason.
/// User space finds it by `proxy_common::counters::MALFORMED_STATS_MAP`.
#[map]
static SCM_MALFORMED: PerCpuArray<u64> = PerCpuArray::with_max_entries(Malformed::COUNT, 0);

/// The ingress program: parse, count, decide.
///
/// Declared multi-buffer capable (`frags`): a driver then keeps jumbo MTUs and, on veth, the
/// peer keeps handing over whole GSO super-frames, instead of refusing the program or giving
/// every frame to it one page at a time (see docs/data-plane.md, "Steering and multi-buffer").
#[xdp(frags)]
pub fn scm_ingress(ctx: XdpContext) -> u32 {
    match try_ingress(&ctx) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_ABORTED,
    }
}

#[inline(always)]
fn try_ingress(ctx: &XdpContext) -> Result<u32, ()> {
    let frame = XdpFrame(ctx);
    let len = frame.frame_len();
    let parsed = parse(&frame);
    count_class(classify(&parsed), len as u64)?;
    if let Err(reason) = parsed {
        count_malformed(reason)?;
        debug!(
            ctx,
            "scm_ingress: malformed frame, reason {} ({} bytes)",
            reason.index(),
            len
        );
    }
    // Malformed frames pass (the kernel stack drops them itself, and counting them is the
    // job), except TCP the shield cannot judge, which `steer::verdict` drops.
    Ok(steer::verdict(ctx, &parsed))
}

#[inline(always)]
fn count_class(class: PacketClass, len: u64) -> Result<(), ()> {
    let counter = SCM_CLASS_STATS.get_ptr_mut(class.index()).ok_or(())?;
    // SAFETY: the pointer comes from a successful lookup in a per-CPU array, so it points at
    // this CPU's slot, which nothing else writes while this program runs on this CPU.
    unsafe { (*counter).count(len) };
    Ok(())
}

#[inline(always)]
fn count_malformed(reason: Malformed) -> Result<(), ()> {
    let counter = SCM_MALFORMED.get_ptr_mut(reason.index()).ok_or(())?;
    // SAFETY: as in `count_class`: this CPU's slot of a per-CPU array, written only from here.
    unsafe { *counter = (*counter).wrapping_add(1) };
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Nothing here panics (the parser is checked-only); were a panic path ever compiled in,
    // the verifier would reject this loop, so the failure shows at load time, not at run time.
    loop {
        core::hint::spin_loop();
    }
}

/// The kernel wants a license string; GPL-only helpers would need a GPL-compatible one, and
/// none is used (bpf_sk_assign, bpf_sk_release, map helpers and bpf_ktime_get_ns are not
/// GPL-only; bpf_tcp_raw_gen_syncookie_ipv4/6 would be, see docs/data-plane.md).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
