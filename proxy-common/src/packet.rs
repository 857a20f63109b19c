//! Bounds-checked access to packet bytes, the only way the parser reads a packet.
//!
//! The parser is generic over [`PacketBytes`] so that the same code runs over a byte slice on the
//! host and over the XDP buffer in the kernel, where the verifier demands a bounds check against
//! `data_end` in front of every load.

/// A packet the parser can read from.
pub trait PacketBytes {
    /// Length of the whole frame in bytes, as the interface delivered it.
    fn frame_len(&self) -> usize;

    /// The `N` bytes starting at `offset`, or `None` when any of them lies past the end of the
    /// frame. Implementations must never read outside the frame.
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;
}

impl PacketBytes for [u8] {
    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.len()
    }

    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let end = offset.checked_add(N)?;
        self.get(offset..end)?.try_into().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::PacketBytes;

    #[test]
    fn slice_loads_stay_inside_the_frame() {
        let frame = [1u8, 2, 3, 4];
        assert_eq!(frame[..].load::<2>(0), Some([1, 2]));
        assert_eq!(frame[..].load::<2>(2), Some([3, 4]));
        assert_eq!(frame[..].load::<2>(3), None);
        assert_eq!(frame[..].load::<4>(0), Some([1, 2, 3, 4]));
        assert_eq!(frame[..].load::<5>(0), None);
        assert_eq!(frame[..].load::<1>(usize::MAX), None);
        assert_eq!(frame[..].load::<0>(4), Some([]));
    }
}
