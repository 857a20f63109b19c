//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): the lookup table the kernel programs
//! index by flow hash, computed here over the healthy workers.
//!
//! Each worker has its own permutation of the table's slots; workers take turns claiming their
//! next free preferred slot until the table is full. Every worker gets within one slot of an
//! even share, and removing a worker moves (almost) only that worker's slots.

use proxy_common::steer::{MAGLEV_SIZE, NO_WORKER};

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The table (length [`MAGLEV_SIZE`]) for the given worker indices; all [`NO_WORKER`] when the
/// list is empty. The result depends on the set of indices only, not their order.
pub fn table(workers: &[u32]) -> Vec<u32> {
    let m = MAGLEV_SIZE as u64;
    let mut table = vec![NO_WORKER; m as usize];
    let mut workers = workers.to_vec();
    workers.sort_unstable();
    workers.dedup();
    if workers.is_empty() {
        return table;
    }
    let perms: Vec<(u64, u64)> = workers
        .iter()
        .map(|&w| {
            let offset = splitmix64(u64::from(w)) % m;
            let skip = splitmix64(u64::from(w) ^ 0x5c3d_5c3d_5c3d_5c3d) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; workers.len()];
    let mut filled = 0u64;
    loop {
        for (i, &w) in workers.iter().enumerate() {
            let (offset, skip) = perms[i];
            // m is prime, so each permutation visits every slot: this terminates.
            let mut slot = (offset + next[i] * skip) % m;
            while table[slot as usize] != NO_WORKER {
                next[i] += 1;
                slot = (offset + next[i] * skip) % m;
            }
            table[slot as usize] = w;
            next[i] += 1;
            filled += 1;
            if filled == m {
                return table;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(t: &[u32], workers: &[u32]) -> Vec<usize> {
        workers
            .iter()
            .map(|w| t.iter().filter(|x| *x == w).count())
            .collect()
    }

    #[test]
    fn every_slot_is_filled_evenly() {
        for n in [1u32, 2, 3, 4, 7, 16, 64] {
            let workers: Vec<u32> = (0..n).collect();
            let t = table(&workers);
            assert!(t.iter().all(|w| *w < n));
            let even = MAGLEV_SIZE as usize / n as usize;
            for s in shares(&t, &workers) {
                assert!(s == even || s == even + 1, "n={n}: share {s}, even {even}");
            }
        }
        assert!(table(&[]).iter().all(|w| *w == NO_WORKER));
    }

    #[test]
    fn removing_a_worker_moves_few_other_slots() {
        let all = table(&[0, 1, 2, 3]);
        let without_2 = table(&[0, 1, 3]);
        let moved_others = all
            .iter()
            .zip(&without_2)
            .filter(|(a, b)| **a != 2 && a != b)
            .count();
        // Maglev is not perfectly minimal; the paper measures a few percent.
        assert!(
            moved_others < MAGLEV_SIZE as usize / 20,
            "{moved_others} slots of surviving workers moved"
        );
        assert!(without_2.iter().all(|w| *w != 2));
    }

    #[test]
    fn order_of_workers_does_not_matter() {
        assert_eq!(table(&[3, 1, 0, 2]), table(&[0, 1, 2, 3]));
    }
}
