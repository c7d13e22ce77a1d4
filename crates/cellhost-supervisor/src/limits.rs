//! Per-tenant caps on the API: a request rate and concurrent streams.
//!
//! A tenant is hostile: one that opens a thousand log-follow streams or
//! sends requests in a tight loop would take the daemon from every other
//! tenant. So each tenant (by owner name) gets a token bucket of
//! `tenants.requestsPerSecond` with bursts of `tenants.burst`, and at most
//! `tenants.maxStreams` streams open at once (logs or events followed,
//! execs running). Over a cap the API answers 429 with a stable code
//! (`rate_limited`, `too_many_streams`). The operator is never limited.
//!
//! Memory is bounded: idle full buckets are forgotten once there are more
//! than [`MAX_TRACKED`] tenants, and stream counts go with their last
//! stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cellhost_policy::Tenants;

/// Tenants whose buckets are kept before idle ones are pruned.
pub const MAX_TRACKED: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug)]
pub struct TenantLimits {
    cfg: Tenants,
    buckets: Mutex<HashMap<String, Bucket>>,
    streams: Mutex<HashMap<String, u32>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An open stream of one tenant; the count drops with it.
#[derive(Debug)]
pub struct StreamGuard {
    limits: Arc<TenantLimits>,
    owner: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut s = lock(&self.limits.streams);
        if let Some(n) = s.get_mut(&self.owner) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.remove(&self.owner);
            }
        }
    }
}

impl TenantLimits {
    pub fn new(cfg: Tenants) -> Arc<TenantLimits> {
        Arc::new(TenantLimits {
            cfg,
            buckets: Mutex::default(),
            streams: Mutex::default(),
        })
    }

    /// Take one request from `owner`'s bucket, or say how long until one
    /// is there.
    pub fn request(&self, owner: &str) -> Result<(), Duration> {
        self.request_at(owner, Instant::now())
    }

    fn request_at(&self, owner: &str, now: Instant) -> Result<(), Duration> {
        let rate = self.cfg.requests_per_second;
        let burst = f64::from(self.cfg.burst);
        let mut b = lock(&self.buckets);
        if b.len() >= MAX_TRACKED && !b.contains_key(owner) {
            // Forget tenants whose bucket has refilled: they owe nothing.
            b.retain(|_, k| k.tokens + now.duration_since(k.at).as_secs_f64() * rate < burst);
        }
        let k = b.entry(owner.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        k.tokens = (k.tokens + now.duration_since(k.at).as_secs_f64() * rate).min(burst);
        k.at = now;
        if k.tokens >= 1.0 {
            k.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - k.tokens) / rate))
        }
    }

    /// Open a stream for `owner`, or `None` when it has the most it may.
    pub fn stream(self: &Arc<Self>, owner: &str) -> Option<StreamGuard> {
        let mut s = lock(&self.streams);
        let n = s.entry(owner.to_string()).or_insert(0);
        if *n >= self.cfg.max_streams {
            return None;
        }
        *n += 1;
        Some(StreamGuard {
            limits: self.clone(),
            owner: owner.to_string(),
        })
    }

    /// Streams `owner` has open (tests, metrics).
    pub fn open_streams(&self, owner: &str) -> u32 {
        lock(&self.streams).get(owner).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Arc<TenantLimits> {
        TenantLimits::new(Tenants {
            max_cells: 1,
            max_streams: 2,
            requests_per_second: 10.0,
            burst: 3,
        })
    }

    #[test]
    fn buckets_refill_at_the_rate_and_are_per_tenant() {
        let l = limits();
        let t0 = Instant::now();
        for _ in 0..3 {
            l.request_at("a", t0).unwrap();
        }
        let wait = l.request_at("a", t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO);
        l.request_at("b", t0).unwrap();
        l.request_at("a", t0 + Duration::from_millis(100)).unwrap();
        assert!(l.request_at("a", t0 + Duration::from_millis(100)).is_err());
    }

    #[test]
    fn streams_are_capped_and_freed_by_their_guard() {
        let l = limits();
        let g1 = l.stream("a").unwrap();
        let _g2 = l.stream("a").unwrap();
        assert!(l.stream("a").is_none());
        assert!(l.stream("b").is_some());
        drop(g1);
        assert_eq!(l.open_streams("a"), 1);
        assert!(l.stream("a").is_some());
    }

    #[test]
    fn memory_stays_bounded() {
        let l = limits();
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED + 50) {
            l.request_at(&format!("t{i}"), t0).unwrap();
        }
        let later = t0 + Duration::from_secs(10);
        l.request_at("new", later).unwrap();
        assert!(lock(&l.buckets).len() < 10, "refilled buckets were pruned");
    }
}
