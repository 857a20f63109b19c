//! The XDP buffer seen through [`PacketBytes`], so the shared parser runs on it unchanged.
//!
//! The program declares multi-buffer support (`xdp.frags`), so a frame may be a linear head
//! (`data..data_end`) followed by fragments the program cannot address directly: jumbo frames,
//! GRO/LRO aggregates, veth peers that keep GSO. Lengths therefore come from
//! `bpf_xdp_get_buff_len` (the whole frame) and a header that does not lie wholly in the linear
//! head is copied out with `bpf_xdp_load_bytes` instead of being taken as truncated.

use aya_ebpf::{
    helpers::generated::{bpf_xdp_get_buff_len, bpf_xdp_load_bytes},
    programs::XdpContext,
};
use proxy_common::PacketBytes;

/// The frame an XDP program is running on.
pub struct XdpFrame<'a>(pub &'a XdpContext);

impl XdpFrame<'_> {
    /// Bytes in the linear head, the part direct packet access reaches.
    #[inline(always)]
    fn linear_len(&self) -> usize {
        self.0.data_end().saturating_sub(self.0.data())
    }
}

impl PacketBytes for XdpFrame<'_> {
    #[inline(always)]
    fn frame_len(&self) -> usize {
        // SAFETY: the context pointer is the one the kernel passed this program; the helper only
        // reads the buffer's length (head plus fragments).
        let whole = unsafe { bpf_xdp_get_buff_len(self.0.ctx) } as usize;
        // A single-buffer frame has no fragments; never report less than the head itself.
        whole.max(self.linear_len())
    }

    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let start = self.0.data();
        let end = self.0.data_end();
        // The verifier only accepts a packet access when it has seen this very comparison of
        // the packet pointer plus the access length against data_end.
        if start + offset + N <= end {
            let ptr = (start + offset) as *const [u8; N];
            // SAFETY: the N bytes at `ptr` lie between data and data_end (checked above) and
            // stay valid while the program runs; `[u8; N]` has alignment 1, so any address is
            // aligned.
            return Some(unsafe { ptr.read() });
        }
        // Past the linear head: the bytes may sit in a fragment. The helper checks the range
        // against the whole frame itself and fails (negative return) past its end; the offset
        // is bounded first so that the verifier sees a small, non-negative u32.
        if N == 0 || offset > 0xffff {
            return None;
        }
        let mut out = [0u8; N];
        // SAFETY: `out` is N writable bytes on this program's stack, the length passed is N,
        // and the context pointer is the kernel's; the helper writes at most N bytes.
        let rc = unsafe {
            bpf_xdp_load_bytes(self.0.ctx, offset as u32, out.as_mut_ptr().cast(), N as u32)
        };
        (rc == 0).then_some(out)
    }
}
