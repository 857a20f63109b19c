//! The per-class counters the XDP program keeps and user space reads: their classes, their
//! memory layout and the names of the maps that hold them.

/// Per-CPU array, indexed by [`PacketClass`], of [`ClassCounter`].
pub const CLASS_STATS_MAP: &str = "SCM_CLASS_STATS";

/// Per-CPU array, indexed by [`crate::Malformed`], of `u64` packet counts: why packets were
/// classified malformed.
pub const MALFORMED_STATS_MAP: &str = "SCM_MALFORMED";

/// What the ingress parser made of a packet. The discriminant is the index into
/// [`CLASS_STATS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PacketClass {
    /// TCP with SYN set and ACK clear: a connection attempt, what a SYN flood is made of.
    TcpSyn = 0,
    /// Any other TCP segment, SYN+ACK included.
    Tcp = 1,
    /// UDP.
    Udp = 2,
    /// Well-formed but not TCP or UDP: non-IP frames (ARP, LLDP), ICMP, non-first IP fragments,
    /// ESP, IPv6 extension chains longer than the parser follows.
    Other = 3,
    /// A header that is cut short or contradicts itself. [`MALFORMED_STATS_MAP`] says which.
    Malformed = 4,
}

impl PacketClass {
    /// Number of classes, the `max_entries` of [`CLASS_STATS_MAP`].
    pub const COUNT: u32 = 5;

    /// Every class, in index order.
    pub const ALL: [PacketClass; Self::COUNT as usize] = [
        Self::TcpSyn,
        Self::Tcp,
        Self::Udp,
        Self::Other,
        Self::Malformed,
    ];

    /// Index into [`CLASS_STATS_MAP`].
    #[inline(always)]
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// The name operators see in tables and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Self::TcpSyn => "tcp-syn",
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Other => "other",
            Self::Malformed => "malformed",
        }
    }
}

/// Packets and bytes of one class on one CPU. Bytes are whole frames as XDP sees them: from the
/// destination MAC to the end of the payload, Ethernet padding included, FCS excluded.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassCounter {
    /// Frames counted.
    pub packets: u64,
    /// Sum of their lengths in bytes.
    pub bytes: u64,
}

// SAFETY: `ClassCounter` is `repr(C)` with two `u64` fields and no padding, so every bit pattern
// is a valid value and the kernel's view of it matches ours.
#[cfg(feature = "user")]
unsafe impl aya::Pod for ClassCounter {}

impl ClassCounter {
    /// Adds one frame of `len` bytes. Wrapping, because a counter that overflows must not abort a
    /// kernel program; at 2^64 that never happens in practice.
    #[inline(always)]
    pub fn count(&mut self, len: u64) {
        self.packets = self.packets.wrapping_add(1);
        self.bytes = self.bytes.wrapping_add(len);
    }

    /// Sum of two counters, used to add up the per-CPU values.
    pub const fn plus(self, other: Self) -> Self {
        Self {
            packets: self.packets.wrapping_add(other.packets),
            bytes: self.bytes.wrapping_add(other.bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{ClassCounter, PacketClass};

    #[test]
    fn class_indices_are_dense_and_in_order() {
        for (i, class) in PacketClass::ALL.iter().enumerate() {
            assert_eq!(class.index() as usize, i);
        }
    }

    #[test]
    fn counter_layout_has_no_padding() {
        assert_eq!(core::mem::size_of::<ClassCounter>(), 16);
        assert_eq!(core::mem::align_of::<ClassCounter>(), 8);
    }

    #[test]
    fn counters_add_up() {
        let mut c = ClassCounter::default();
        c.count(60);
        c.count(1514);
        assert_eq!(
            c,
            ClassCounter {
                packets: 2,
                bytes: 1574
            }
        );
        assert_eq!(
            c.plus(c),
            ClassCounter {
                packets: 4,
                bytes: 3148
            }
        );
    }
}
