//! Which endpoint of the candidates (a Service's healthy, not ejected endpoints, in
//! the model's order) a request goes to, per DestinationRule load balancer
//! ([`crate::destination::LoadBalancer`]), with randomness and the request's hash key
//! as inputs:
//!
//! - round robin: the `turn`-th candidate (the caller counts turns per Service port);
//! - random: one at random;
//! - least request, as Envoy's with equal weights: two candidates at random, the one
//!   with fewer active requests ("power of two choices");
//! - consistent hash: a ring ([`HashRing`], Envoy's `RING_HASH` shape) of virtual
//!   points per endpoint; a key goes to the first point at or after its hash. An
//!   endpoint leaving moves only the keys it held; one joining takes only keys from
//!   its neighbours. A request without its key is balanced at random, as Envoy does.

use crate::destination::LoadBalancer;

/// What a pick needs beyond the load balancer.
#[derive(Debug, Clone, Copy)]
pub struct PickInput<'a> {
    /// Active requests per candidate (least request); may be empty otherwise.
    pub active: &'a [u64],
    /// The round-robin turn.
    pub turn: u64,
    /// Two random numbers.
    pub random: [u64; 2],
    /// The request's hash key ([`hash_key`]), for a consistent hash.
    pub hash: Option<u64>,
    /// The ring over the candidates, for a consistent hash.
    pub ring: Option<&'a HashRing>,
}

/// The index of the candidate `lb` picks among `n` (`n > 0`); `None` when `n` is 0.
pub fn pick(lb: &LoadBalancer, n: usize, input: &PickInput<'_>) -> Option<usize> {
    if n == 0 {
        return None;
    }
    let at = |r: u64| (r % n as u64) as usize;
    Some(match lb {
        LoadBalancer::RoundRobin => at(input.turn),
        LoadBalancer::Random => at(input.random[0]),
        LoadBalancer::LeastRequest => {
            let (a, b) = (at(input.random[0]), at(input.random[1]));
            let active = |i: usize| input.active.get(i).copied().unwrap_or(0);
            if active(b) < active(a) {
                b
            } else {
                a
            }
        }
        LoadBalancer::ConsistentHash(_) => match (input.hash, input.ring) {
            (Some(h), Some(ring)) if ring.len() == n => ring.pick(h),
            _ => at(input.random[0]),
        },
    })
}

/// A request's hash key from its bytes (a header's value, a cookie, an address):
/// FNV-1a, then a 64-bit finalizer, so close keys land far apart on the ring.
pub fn hash_key(bytes: &[u8]) -> u64 {
    mix(crate::fnv1a(bytes))
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Points on the ring per endpoint. Fixed, not scaled to a total as Envoy's
/// `minimum_ring_size` does, so an endpoint joining or leaving never moves the points
/// of the others.
pub const POINTS_PER_ENDPOINT: usize = 256;

/// A consistent-hash ring over endpoints named by stable keys (`podIP:port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashRing {
    /// (point, candidate index), sorted by point.
    points: Vec<(u64, usize)>,
    len: usize,
}

impl HashRing {
    /// The ring of `keys` (the candidates, in order): each gets the same number of
    /// points, hashed from its key, so its place does not depend on the others.
    pub fn new<K: AsRef<[u8]>>(keys: &[K]) -> HashRing {
        let len = keys.len();
        let per = POINTS_PER_ENDPOINT;
        let mut points = Vec::with_capacity(per * len);
        for (i, key) in keys.iter().enumerate() {
            let base = hash_key(key.as_ref());
            for replica in 0..per as u64 {
                points.push((mix(base ^ mix(replica + 1)), i));
            }
        }
        points.sort_unstable();
        HashRing { points, len }
    }

    /// How many candidates it spans.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The candidate of the first point at or after `hash` (wrapping around).
    pub fn pick(&self, hash: u64) -> usize {
        let at = self.points.partition_point(|(p, _)| *p < hash);
        self.points
            .get(at)
            .or_else(|| self.points.first())
            .map_or(0, |(_, i)| *i)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::destination::HashKey;

    fn input(turn: u64, random: [u64; 2]) -> PickInput<'static> {
        PickInput {
            active: &[],
            turn,
            random,
            hash: None,
            ring: None,
        }
    }

    #[test]
    fn round_robin_random_and_nothing_to_pick() {
        let rr = LoadBalancer::RoundRobin;
        let picks: Vec<_> = (0..6)
            .map(|t| pick(&rr, 3, &input(t, [0, 0])).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        assert_eq!(pick(&LoadBalancer::Random, 3, &input(0, [7, 0])), Some(1));
        assert_eq!(pick(&rr, 0, &input(0, [0, 0])), None);
    }

    #[test]
    fn least_request_takes_the_less_busy_of_two_random_endpoints() {
        let lr = LoadBalancer::LeastRequest;
        let active = [5, 0, 3];
        for (random, want) in [
            ([0, 1], 1),
            ([1, 0], 1),
            ([0, 2], 2),
            ([2, 2], 2),
            // A tie keeps the first choice.
            ([3, 0], 0),
        ] {
            let got = pick(
                &lr,
                3,
                &PickInput {
                    active: &active,
                    ..input(0, random)
                },
            );
            assert_eq!(got, Some(want), "{random:?}");
        }
    }

    #[test]
    fn a_consistent_hash_keeps_a_key_on_one_endpoint_and_moves_few_on_churn() {
        let lb = LoadBalancer::ConsistentHash(HashKey::Header {
            name: "x-user".into(),
        });
        let keys: Vec<String> = (1..=4).map(|i| format!("10.1.0.{i}:8080")).collect();
        let ring = HashRing::new(&keys);
        assert_eq!(ring.len(), 4);
        let at = |ring: &HashRing, user: &str, n| {
            pick(
                &lb,
                n,
                &PickInput {
                    hash: Some(hash_key(user.as_bytes())),
                    ring: Some(ring),
                    ..input(0, [0, 0])
                },
            )
            .unwrap()
        };
        let users: Vec<String> = (0..2000).map(|i| format!("user-{i}")).collect();
        let before: Vec<usize> = users.iter().map(|u| at(&ring, u, 4)).collect();
        // The same key, the same endpoint, every time.
        assert!(users
            .iter()
            .zip(&before)
            .all(|(u, b)| at(&ring, u, 4) == *b));
        // Spread: every endpoint holds between 15 % and 35 % of the keys.
        for e in 0..4 {
            let share = before.iter().filter(|b| **b == e).count();
            assert!((300..=700).contains(&share), "endpoint {e}: {share}");
        }
        // Endpoint 2 leaves: only its keys move.
        let fewer: Vec<String> = keys
            .iter()
            .filter(|k| !k.ends_with(".3:8080"))
            .cloned()
            .collect();
        let ring3 = HashRing::new(&fewer);
        let mut moved = 0;
        for (u, b) in users.iter().zip(&before) {
            let now = &fewer[at(&ring3, u, 3)];
            if *now != keys[*b] {
                moved += 1;
                assert_eq!(
                    keys[*b], "10.1.0.3:8080",
                    "{u} moved from a staying endpoint"
                );
            }
        }
        assert_eq!(moved, before.iter().filter(|b| **b == 2).count());
        // A request without the key, or a ring of other candidates: at random.
        assert_eq!(pick(&lb, 4, &input(0, [6, 0])), Some(2));
        let stale = PickInput {
            hash: Some(1),
            ring: Some(&ring3),
            ..input(0, [5, 0])
        };
        assert_eq!(pick(&lb, 4, &stale), Some(1));
    }

    #[test]
    fn the_ring_of_nothing_is_empty_and_hash_keys_differ() {
        let ring = HashRing::new::<&str>(&[]);
        assert!(ring.is_empty());
        assert_ne!(hash_key(b"a"), hash_key(b"b"));
        assert_eq!(hash_key(b"a"), hash_key(b"a"));
    }
}
