//! Peak-EWMA latency estimate (Finagle's `PeakEwma`, linkerd / tower's
//! `PeakEwma`): the estimate jumps up to any sample above it at once and
//! otherwise blends samples in with weight `1 - exp(-elapsed / decay)`; when
//! read, it decays towards 0 with the time since the last sample, and the
//! cost of a backend is `estimate * (active + 1)`. Time comes only from the
//! arguments.

use std::sync::atomic::Ordering::Relaxed;

use crate::Load;

/// `exp(-elapsed / decay)`; a decay of 0 counts as 1 ns.
#[inline]
fn decay_factor(elapsed_nanos: u64, decay_nanos: u64) -> f64 {
    (-(elapsed_nanos as f64) / (decay_nanos.max(1) as f64)).exp()
}

pub(crate) fn observe(load: &Load, latency_nanos: u64, now_nanos: u64, decay_nanos: u64) {
    let sample = latency_nanos.max(1);
    let stamp = load.ewma_stamp_nanos.load(Relaxed);
    let elapsed = now_nanos.saturating_sub(stamp);
    let keep = decay_factor(elapsed, decay_nanos);
    // A CAS loop so concurrent observers on several cores do not lose a
    // peak; the stamp is only moved forward.
    let _ = load.ewma_nanos.fetch_update(Relaxed, Relaxed, |prev| {
        Some(if prev == 0 || sample >= prev {
            sample
        } else {
            let blended = prev as f64 * keep + sample as f64 * (1.0 - keep);
            (blended.round() as u64).max(1)
        })
    });
    load.ewma_stamp_nanos.fetch_max(now_nanos, Relaxed);
}

pub(crate) fn cost(load: &Load, now_nanos: u64, decay_nanos: u64) -> f64 {
    let ewma = load.ewma_nanos.load(Relaxed);
    if ewma == 0 {
        return 0.0;
    }
    let elapsed = now_nanos.saturating_sub(load.ewma_stamp_nanos.load(Relaxed));
    let active = load.active.load(Relaxed);
    ewma as f64 * decay_factor(elapsed, decay_nanos) * (f64::from(active) + 1.0)
}

#[cfg(test)]
mod tests {
    use crate::Load;

    const SEC: u64 = 1_000_000_000;
    const MS: u64 = 1_000_000;

    #[test]
    fn peak_then_decay() {
        let l = Load::default();
        assert_eq!(l.cost(0, 10 * SEC), 0.0);
        l.observe(10 * MS, SEC, 10 * SEC);
        assert_eq!(l.cost(SEC, 10 * SEC), (10 * MS) as f64);
        // A higher sample replaces the estimate at once.
        l.observe(30 * MS, 2 * SEC, 10 * SEC);
        assert_eq!(
            l.ewma_nanos.load(std::sync::atomic::Ordering::Relaxed),
            30 * MS
        );
        // A lower one is blended: after one decay constant, 1/e of the old.
        l.observe(10 * MS, 12 * SEC, 10 * SEC);
        let want = 30.0 * (-1f64).exp() + 10.0 * (1.0 - (-1f64).exp());
        let got = l.ewma_nanos.load(std::sync::atomic::Ordering::Relaxed) as f64 / MS as f64;
        assert!((got - want).abs() < 1e-3, "{got} vs {want}");
        // Read-time decay, and active connections multiply the cost.
        let c0 = l.cost(12 * SEC, 10 * SEC);
        let c1 = l.cost(22 * SEC, 10 * SEC);
        assert!((c1 / c0 - (-1f64).exp()).abs() < 1e-9);
        l.active.store(3, std::sync::atomic::Ordering::Relaxed);
        assert!((l.cost(12 * SEC, 10 * SEC) / c0 - 4.0).abs() < 1e-9);
    }
}
