//! Splitting a job into shards: contiguous sample ranges, each a whole number of batches.
//!
//! Pure arithmetic, no I/O: sample `i` of a job always gets seed `seed + i` and sits in the same
//! position of the same batch-aligned range, so the images do not depend on how many devices or
//! workers take the shards, in which order, or how often a shard is retried.

/// One unit of work: samples `start..end` of a job (global indices), sampled in batches of the job's
/// batch size starting at `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub start: u64,
    pub end: u64,
}

impl Shard {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// The seed of every sample in the shard, in order.
    pub fn seeds(&self, job_seed: u64) -> impl Iterator<Item = u64> {
        (self.start..self.end).map(move |i| job_seed.wrapping_add(i))
    }
}

/// Shards of `batches_per_shard` batches of `batch_size` samples (the last shard may be shorter).
/// Returns nothing for an empty job; zero sizes are treated as one.
pub fn plan_shards(num_samples: u64, batch_size: u64, batches_per_shard: u64) -> Vec<Shard> {
    let shard_len = batch_size.max(1).saturating_mul(batches_per_shard.max(1));
    (0..num_samples.div_ceil(shard_len))
        .map(|index| Shard {
            index,
            start: index * shard_len,
            end: ((index + 1) * shard_len).min(num_samples),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn small_plans() {
        assert!(plan_shards(0, 8, 4).is_empty());
        assert_eq!(
            plan_shards(5, 2, 1),
            vec![
                Shard { index: 0, start: 0, end: 2 },
                Shard { index: 1, start: 2, end: 4 },
                Shard { index: 2, start: 4, end: 5 },
            ]
        );
        assert_eq!(plan_shards(100, 8, 4).len(), 4);
        assert_eq!(plan_shards(3, 8, 4), vec![Shard { index: 0, start: 0, end: 3 }]);
        assert_eq!(Shard { index: 0, start: 4, end: 6 }.seeds(10).collect::<Vec<_>>(), vec![14, 15]);
    }

    proptest! {
        /// Every sample is in exactly one shard, shards are batch-aligned and in order.
        #[test]
        fn shards_cover_the_job_once(n in 0u64..5000, batch in 1u64..64, per in 1u64..16) {
            let shards = plan_shards(n, batch, per);
            let mut next = 0;
            for (i, s) in shards.iter().enumerate() {
                prop_assert_eq!(s.index, i as u64);
                prop_assert_eq!(s.start, next);
                prop_assert!(!s.is_empty());
                prop_assert_eq!(s.start % batch, 0);
                prop_assert!(s.len() <= batch * per);
                if i + 1 < shards.len() {
                    prop_assert_eq!(s.len(), batch * per);
                }
                next = s.end;
            }
            prop_assert_eq!(next, n);
        }

        /// A sample's batch position does not depend on the shard size chosen.
        #[test]
        fn batch_position_is_independent_of_shard_size(n in 1u64..2000, batch in 1u64..32, a in 1u64..8, b in 1u64..8) {
            let position = |shards: &[Shard], i: u64| {
                let s = shards.iter().find(|s| s.start <= i && i < s.end).unwrap();
                ((i - s.start) / batch, (i - s.start) % batch, s.start / batch + (i - s.start) / batch)
            };
            let (pa, pb) = (plan_shards(n, batch, a), plan_shards(n, batch, b));
            for i in (0..n).step_by(7) {
                let (x, y) = (position(&pa, i), position(&pb, i));
                // Same row within its batch and same global batch number.
                prop_assert_eq!((x.1, x.2), (y.1, y.2));
            }
        }
    }
}
