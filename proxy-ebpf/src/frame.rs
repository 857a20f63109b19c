//! The XDP buffer seen through [`PacketBytes`], so the shared parser runs on it unchanged.

use aya_ebpf::programs::XdpContext;
use proxy_common::PacketBytes;

/// The frame an XDP program is running on.
pub struct XdpFrame<'a>(pub &'a XdpContext);

impl PacketBytes for XdpFrame<'_> {
    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.0.data_end().saturating_sub(self.0.data())
    }

    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let start = self.0.data();
        let end = self.0.data_end();
        // The verifier only accepts a packet access when it has seen this very comparison of
        // the packet pointer plus the access length against data_end.
        if start + offset + N > end {
            return None;
        }
        let ptr = (start + offset) as *const [u8; N];
        // SAFETY: the N bytes at `ptr` lie between data and data_end (checked above) and stay
        // valid while the program runs; `[u8; N]` has alignment 1, so any address is aligned.
        Some(unsafe { ptr.read() })
    }
}
