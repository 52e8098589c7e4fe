//! How many requests each backend is given at once (HTTP mode), and the
//! queue of requests that wait for room.
//!
//! A backend's accept queue is small (busybox httpd listens with a backlog
//! of 9), and a SYN that finds it full is dropped: the request waits for a
//! hedged connect (see `dial`) or the kernel's one-second retransmission,
//! and every extra SYN costs both machines a socket. HAProxy's answer is a
//! `maxconn` per server, set by hand, with a queue in front of it. kiln
//! learns the limit instead, the way TCP learns its window (AIMD): a
//! backend starts without one; a connect to it that had to be hedged (its
//! queue was full) cuts its limit to 7/8 of the requests it had in flight
//! (at most once per [`CUT_EVERY`], never below [`MIN_LIMIT`]), and answered requests raise it again
//! by one per [`GROWTH`] × limit answers. The role's `max_requests`, when
//! set, caps it: the limit in force is the lower of the two. Requests that
//! find every backend at its limit wait here, first come first served, for
//! at most the role's `queue_timeout` ([`QUEUE_TIMEOUT`] by default; `0`:
//! not at all), then get 503 with `Retry-After`, instead of waiting as
//! dropped SYNs in the kernel.
//!
//! Tunnels (upgraded connections) leave the count once switched: they may
//! live for hours and say nothing about the backend's accept queue.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use prometheus::IntGauge;
use tokio::sync::Notify;

use crate::fleet::Backend;

/// A backend set, as `Fleet::current` holds it.
type Set = Arc<Vec<Arc<Backend>>>;

/// How long a request may wait for room on a backend.
pub(crate) const QUEUE_TIMEOUT: Duration = Duration::from_secs(5);
/// The smallest limit. A slow connect with fewer requests than this in
/// flight is not this balancer filling the backend's queue (a SYN lost on
/// the network, other clients, a stalled server): it is hedged but cuts
/// nothing, so one lost packet cannot throttle a healthy backend with
/// slow responses to a trickle.
const MIN_LIMIT: u64 = 8;
/// No limit until the backend shows one.
const NO_LIMIT: u64 = 1 << 20;
/// Fixed point: limits are kept in 1/65536ths, so small increases per
/// answer add up.
const ONE: u64 = 1 << 16;
/// Answers per limit's worth of growth: the limit grows by one every
/// `GROWTH × limit` answers. Slower than TCP's one per window: a full
/// queue shows only when a connect outlives its hedge delay (≥ 20 ms,
/// some hundred answers later), and growing faster than that overflowed
/// the queue again at once (measured: growing by one per limit answers, the
/// queues overflowed about as often as with no limit at all).
const GROWTH: u64 = 16;
/// One overflowing queue makes several connects slow at once: one cut.
const CUT_EVERY: Duration = Duration::from_millis(100);

/// One backend's limit and the requests it holds.
pub(crate) struct Limit {
    in_use: AtomicU32,
    /// The limit in 1/65536ths.
    limit: AtomicU64,
    /// The role's `max_requests`, in requests ([`NO_LIMIT`]: none): the
    /// learnt limit applies only below it.
    cap: AtomicU64,
    /// When it was last cut (µs since [`epoch`]).
    cut_at: AtomicU64,
    /// `kiln_balancer_backend_limit` (0: none).
    gauge: IntGauge,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Limit {
    pub fn new(gauge: IntGauge) -> Limit {
        gauge.set(0);
        Limit {
            in_use: AtomicU32::new(0),
            limit: AtomicU64::new(NO_LIMIT * ONE),
            cap: AtomicU64::new(NO_LIMIT),
            cut_at: AtomicU64::new(0),
            gauge,
        }
    }

    /// The current limit, in requests (`None`: not limited).
    #[cfg(test)]
    fn get(&self) -> Option<u64> {
        let l = self.limit.load(Ordering::Relaxed) / ONE;
        (l < NO_LIMIT).then_some(l)
    }

    /// Shows the limit in force (the learnt one, in 1/65536ths, or the cap).
    fn show(&self, limit: u64) {
        let limit = (limit / ONE).min(self.cap.load(Ordering::Relaxed));
        self.gauge
            .set(if limit >= NO_LIMIT { 0 } else { limit as i64 });
    }

    /// Sets the role's `max_requests` (`None`: only the learnt limit).
    pub fn set_cap(&self, cap: Option<u32>) {
        let cap = cap.map_or(NO_LIMIT, |c| u64::from(c).clamp(1, NO_LIMIT));
        self.cap.store(cap, Ordering::Relaxed);
        self.show(self.limit.load(Ordering::Relaxed));
    }

    /// Takes room for one request if the limit allows it.
    fn try_take(&self) -> bool {
        let limit =
            (self.limit.load(Ordering::Relaxed) / ONE).min(self.cap.load(Ordering::Relaxed));
        self.in_use
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (u64::from(n) < limit).then_some(n + 1)
            })
            .is_ok()
    }

    /// A connect to the backend was hedged: its accept queue was full with
    /// this many requests in flight. Cuts the limit below that.
    pub fn congested(&self) {
        let in_use = u64::from(self.in_use.load(Ordering::Relaxed));
        if in_use < MIN_LIMIT {
            return;
        }
        let now = epoch().elapsed().as_micros() as u64;
        let last = self.cut_at.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < CUT_EVERY.as_micros() as u64 {
            return;
        }
        if self
            .cut_at
            .compare_exchange(last, now.max(1), Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let cut = (in_use * ONE * 7 / 8).max(MIN_LIMIT * ONE);
        let was = self.limit.fetch_min(cut, Ordering::AcqRel);
        self.show(was.min(cut));
    }

    /// An answered request: the limit grows by 1/(GROWTH × limit).
    pub fn answered(&self) {
        let l = self.limit.load(Ordering::Relaxed);
        if l >= NO_LIMIT * ONE {
            return;
        }
        let grown = (l + (ONE * ONE).div_ceil(l.max(1) * GROWTH)).min(NO_LIMIT * ONE);
        // A lost race loses one increment: harmless.
        if self
            .limit
            .compare_exchange(l, grown, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
            && grown / ONE != l / ONE
        {
            self.show(grown);
        }
    }
}

/// Room for one request on a backend, given back on drop (or on
/// [`Slot::release`]).
pub(crate) struct Slot {
    pub backend: Arc<Backend>,
    held: bool,
}

impl Slot {
    /// Room taken regardless of the limit: a retry on another backend,
    /// which already waited its turn.
    pub fn force(backend: Arc<Backend>) -> Slot {
        backend.limit.in_use.fetch_add(1, Ordering::AcqRel);
        Slot {
            backend,
            held: true,
        }
    }

    /// Leaves the count (a tunnel); idempotent.
    pub fn release(&mut self) {
        if std::mem::take(&mut self.held) {
            self.backend.limit.in_use.fetch_sub(1, Ordering::AcqRel);
            self.backend.queue.freed();
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.release();
    }
}

/// Why a request got no room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// No backend of the set passes its checks any more.
    NoBackend,
    /// It waited its queue timeout ([`QUEUE_TIMEOUT`] or the role's;
    /// with `0`, it found no room at once).
    Timeout,
}

/// Requests waiting for room, shared by every backend of a balancer.
pub(crate) struct Queue {
    notify: Notify,
    waiting: AtomicUsize,
    /// How long a request may wait (ms): the role's `queue_timeout`, or
    /// [`QUEUE_TIMEOUT`].
    timeout_ms: AtomicU64,
    /// `kiln_balancer_queued_requests`.
    gauge: IntGauge,
}

impl Queue {
    pub fn new(gauge: IntGauge) -> Queue {
        Queue {
            notify: Notify::new(),
            waiting: AtomicUsize::new(0),
            timeout_ms: AtomicU64::new(QUEUE_TIMEOUT.as_millis() as u64),
            gauge,
        }
    }

    /// Sets the role's `queue_timeout` (`None`: [`QUEUE_TIMEOUT`]); for
    /// requests that start waiting from now on.
    pub fn set_timeout(&self, ms: Option<u64>) {
        let ms = ms.unwrap_or(QUEUE_TIMEOUT.as_millis() as u64);
        self.timeout_ms.store(ms, Ordering::Relaxed);
    }

    /// Room was given back: the first waiter (if any) tries again.
    fn freed(&self) {
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.notify.notify_one();
        }
    }

    /// The backends changed (a switch, or one went down or came back):
    /// every waiter looks again.
    pub fn changed(&self) {
        self.notify.notify_waiters();
    }

    /// Room on the first backend of `set`, from `first` on, that passes
    /// its checks and is under its limit: at once if nobody is waiting,
    /// else in turn, looking at the `current` set each time (a switch
    /// while waiting sends the request to the new set). Returns the set
    /// it chose from, the backend's index and its room; why not otherwise.
    pub async fn admit(
        &self,
        current: &ArcSwap<Vec<Arc<Backend>>>,
        set: Set,
        first: usize,
    ) -> Result<(Set, usize, Slot), Refused> {
        let timeout = Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed));
        // Without a queue (a timeout of 0) there is no turn to wait for.
        if timeout.is_zero() || self.waiting.load(Ordering::Acquire) == 0 {
            if let Some((i, slot)) = try_set(&set, first) {
                return Ok((set, i, slot));
            }
            if timeout.is_zero() {
                let up = set.iter().any(|b| b.is_up());
                return Err(if up {
                    Refused::Timeout
                } else {
                    Refused::NoBackend
                });
            }
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        self.gauge.inc();
        let _leave = Leave(self);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let set = current.load_full();
            if !set.iter().any(|b| b.is_up()) {
                return Err(Refused::NoBackend);
            }
            // Each room given back wakes one waiter: no need to wake the
            // next in line from here.
            if let Some((i, slot)) = try_set(&set, first) {
                return Ok((set, i, slot));
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline) => return Err(Refused::Timeout),
            }
        }
    }
}

/// Gives the waiting count back however `admit` ends (cancelled too).
struct Leave<'a>(&'a Queue);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
        self.0.gauge.dec();
    }
}

fn try_set(set: &[Arc<Backend>], first: usize) -> Option<(usize, Slot)> {
    let n = set.len();
    (0..n).map(|k| (first + k) % n).find_map(|i| {
        let b = &set[i];
        (b.is_up() && b.limit.try_take()).then(|| {
            (
                i,
                Slot {
                    backend: b.clone(),
                    held: true,
                },
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    type Current = ArcSwap<Vec<Arc<Backend>>>;

    fn limit() -> Limit {
        Limit::new(IntGauge::new("limit", "test").unwrap())
    }

    #[test]
    fn a_backend_is_unlimited_until_a_connect_is_hedged() {
        let l = limit();
        assert_eq!(l.get(), None);
        for _ in 0..1000 {
            assert!(l.try_take());
        }
        l.congested();
        assert_eq!(l.get(), Some(875));
        assert!(!l.try_take(), "over the new limit");
    }

    #[test]
    fn a_cut_is_once_per_episode_and_never_below_the_minimum() {
        let l = limit();
        l.in_use.store(MIN_LIMIT as u32 - 1, Ordering::Relaxed);
        l.congested();
        assert_eq!(
            l.get(),
            None,
            "too few in flight to be this balancer's doing"
        );
        l.in_use.store(MIN_LIMIT as u32, Ordering::Relaxed);
        l.congested();
        assert_eq!(l.get(), Some(MIN_LIMIT));
        assert!(!l.try_take());
        // A second slow connect right after is the same episode.
        l.limit.store(40 * ONE, Ordering::Relaxed);
        l.congested();
        assert_eq!(l.get(), Some(40));
    }

    #[test]
    fn answers_raise_the_limit_by_one_per_growth_times_limit_answers() {
        let l = limit();
        l.limit.store(10 * ONE, Ordering::Relaxed);
        // From 10 to 11 takes GROWTH × 10.5 answers (each adds 1/(GROWTH × l)).
        for _ in 0..10 * GROWTH {
            l.answered();
        }
        assert_eq!(l.get(), Some(10));
        for _ in 0..GROWTH {
            l.answered();
        }
        assert_eq!(l.get(), Some(11));
    }

    fn backends(
        metrics: &crate::metrics::Metrics,
        queue: &Arc<Queue>,
        n: u16,
    ) -> Vec<Arc<Backend>> {
        (0..n)
            .map(|i| {
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 1000 + i));
                let b = Arc::new(Backend::new(addr, metrics, queue.clone()));
                b.limit.limit.store(ONE, Ordering::Relaxed);
                b
            })
            .collect()
    }

    fn fleet(n: u16) -> (Arc<Queue>, Arc<Current>) {
        let metrics = crate::metrics::Metrics::new();
        let queue = Arc::new(Queue::new(metrics.queued.clone()));
        let set = backends(&metrics, &queue, n);
        (queue, Arc::new(ArcSwap::from_pointee(set)))
    }

    /// Waits in `admit` on its own task; the handle says which backend.
    fn wait(
        queue: &Arc<Queue>,
        current: &Arc<Current>,
    ) -> tokio::task::JoinHandle<Result<(std::net::SocketAddr, Slot), Refused>> {
        let (queue, current) = (queue.clone(), current.clone());
        tokio::spawn(async move {
            let set = current.load_full();
            let (_, _, slot) = queue.admit(&current, set.clone(), 0).await?;
            Ok((slot.backend.addr, slot))
        })
    }

    /// One backend with a limit of one, taken: the next request finds no
    /// room. The queue waits `timeout_ms` (`None`: the default).
    async fn one_full(timeout_ms: Option<u64>) -> (Arc<Queue>, Arc<Current>, Set, Slot) {
        let (queue, current) = fleet(1);
        queue.set_timeout(timeout_ms);
        let set = current.load_full();
        let (_, _, held) = queue.admit(&current, set.clone(), 0).await.unwrap();
        (queue, current, set, held)
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn requests_over_every_limit_wait_in_turn_for_room() {
        let (queue, current) = fleet(2);
        let set = current.load_full();
        let (_, a, slot_a) = queue.admit(&current, set.clone(), 0).await.unwrap();
        // The first backend is full: the next request goes to the second.
        let (_, b, slot_b) = queue.admit(&current, set.clone(), 0).await.unwrap();
        assert_eq!((a, b), (0, 1));
        let first = wait(&queue, &current);
        settle().await;
        let second = wait(&queue, &current);
        settle().await;
        assert_eq!(queue.gauge.get(), 2);
        assert!(!first.is_finished() && !second.is_finished());
        drop(slot_b);
        let (addr, _held) = first.await.unwrap().unwrap();
        assert_eq!(addr, set[1].addr, "the first in line gets the room");
        assert!(!second.is_finished());
        drop(slot_a);
        let (addr, _held2) = second.await.unwrap().unwrap();
        assert_eq!(addr, set[0].addr);
        assert_eq!(queue.gauge.get(), 0);
    }

    #[tokio::test]
    async fn a_switch_while_waiting_sends_the_request_to_the_new_set() {
        let (queue, current, _, _held) = one_full(None).await;
        let waiter = wait(&queue, &current);
        settle().await;
        let metrics = crate::metrics::Metrics::new();
        let new = backends(&metrics, &queue, 1);
        let new_addr = new[0].addr;
        current.store(Arc::new(new));
        queue.changed();
        let (addr, _slot) = waiter.await.unwrap().unwrap();
        assert_eq!(addr, new_addr);
    }

    #[tokio::test]
    async fn waiters_give_up_when_no_backend_is_up_or_after_the_timeout() {
        let (queue, current, set, _held) = one_full(None).await;
        let waiter = wait(&queue, &current);
        settle().await;
        set[0].down.store(true, Ordering::SeqCst);
        queue.changed();
        assert_eq!(waiter.await.unwrap().err(), Some(Refused::NoBackend));

        set[0].down.store(false, Ordering::SeqCst);
        tokio::time::pause();
        let waiter = wait(&queue, &current);
        settle().await;
        tokio::time::advance(QUEUE_TIMEOUT + Duration::from_millis(1)).await;
        assert_eq!(waiter.await.unwrap().err(), Some(Refused::Timeout));
        assert_eq!(queue.gauge.get(), 0);
    }

    #[test]
    fn max_requests_caps_the_learnt_limit() {
        let l = limit();
        l.set_cap(Some(3));
        assert_eq!(l.gauge.get(), 3);
        for _ in 0..3 {
            assert!(l.try_take());
        }
        assert!(!l.try_take(), "over max_requests");
        // A learnt limit below the cap is the one in force.
        l.in_use.store(16, Ordering::Relaxed);
        l.set_cap(Some(100));
        l.congested();
        assert_eq!(l.get(), Some(14));
        assert_eq!(l.gauge.get(), 14);
        l.set_cap(None);
        assert_eq!(l.gauge.get(), 14);
    }

    #[tokio::test]
    async fn a_queue_timeout_of_zero_answers_at_once() {
        let (queue, current, set, _held) = one_full(Some(0)).await;
        let refused = queue.admit(&current, set.clone(), 0).await.err();
        assert_eq!(refused, Some(Refused::Timeout));
        assert_eq!(queue.gauge.get(), 0, "nothing waited");
        set[0].down.store(true, Ordering::SeqCst);
        let refused = queue.admit(&current, set.clone(), 0).await.err();
        assert_eq!(refused, Some(Refused::NoBackend));
    }

    #[tokio::test]
    async fn a_role_queue_timeout_replaces_the_default() {
        let (queue, current, _, _held) = one_full(Some(200)).await;
        tokio::time::pause();
        let waiter = wait(&queue, &current);
        settle().await;
        tokio::time::advance(Duration::from_millis(150)).await;
        settle().await;
        assert!(!waiter.is_finished(), "gave up before its timeout");
        tokio::time::advance(Duration::from_millis(60)).await;
        assert_eq!(waiter.await.unwrap().err(), Some(Refused::Timeout));
    }

    #[test]
    fn a_tunnel_leaves_the_count() {
        let metrics = crate::metrics::Metrics::new();
        let queue = Arc::new(Queue::new(metrics.queued.clone()));
        let b = backends(&metrics, &queue, 1).remove(0);
        let mut slot = Slot::force(b.clone());
        assert_eq!(b.limit.in_use.load(Ordering::Relaxed), 1);
        slot.release();
        slot.release();
        drop(slot);
        assert_eq!(b.limit.in_use.load(Ordering::Relaxed), 0);
    }
}
