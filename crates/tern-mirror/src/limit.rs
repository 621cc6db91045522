//! Token buckets for replication bandwidth (`rbd_mirror_bandwidth_limit`
//! per daemon, `rbd_mirror_peer_bandwidth_limit` per peer): the seed's
//! answer to a thin WAN link is "implement QoS".

use std::time::{Duration, Instant};
use tokio::sync::Mutex;

pub struct Limiter {
    state: Mutex<State>,
}

struct State {
    rate: u64,
    tokens: f64,
    at: Instant,
}

impl Limiter {
    pub fn new(rate: u64) -> Limiter {
        Limiter {
            state: Mutex::new(State {
                rate,
                tokens: 0.0,
                at: Instant::now(),
            }),
        }
    }

    /// Changes the rate (0: unlimited) without losing the bucket.
    pub async fn set_rate(&self, rate: u64) {
        self.state.lock().await.rate = rate;
    }

    /// Waits until `n` bytes may pass. Holding the lock while sleeping makes
    /// concurrent transfers share the rate fairly in arrival order.
    pub async fn take(&self, n: u64) {
        let mut s = self.state.lock().await;
        if s.rate == 0 {
            return;
        }
        let now = Instant::now();
        let rate = s.rate as f64;
        // At most a quarter second of burst: an idle link must not let a
        // new transfer start with a flood.
        s.tokens = (s.tokens + now.duration_since(s.at).as_secs_f64() * rate).min(rate / 4.0);
        s.at = now;
        s.tokens -= n as f64;
        if s.tokens < 0.0 {
            let wait = Duration::from_secs_f64(-s.tokens / rate);
            tokio::time::sleep(wait).await;
            s.tokens = 0.0;
            s.at = Instant::now();
        }
    }
}
