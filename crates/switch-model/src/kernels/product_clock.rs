//! The wall time and FLOPs of the parameter products ([`super::param_matmul_fused`],
//! [`super::expert_matmul_fused`]: every linear layer, the experts and the output layer), forward
//! and backward, summed while switched on: how `switch-bench engine` splits a step into products
//! and the rest. The time includes taking the output and gradient buffers and zeroing the slots
//! left idle; the FLOPs count the rows each product multiplies. Off by default, when a product
//! pays one relaxed atomic load.
//!
//! ```
//! use switch_model::kernels::product_clock;
//! product_clock::set(true);
//! // … training steps …
//! let (seconds, flops) = product_clock::read();
//! product_clock::set(false);
//! assert_eq!((seconds, flops), (0.0, 0.0)); // no product ran here
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

static ON: AtomicBool = AtomicBool::new(false);
static NANOS: AtomicU64 = AtomicU64::new(0);
static FLOPS: AtomicU64 = AtomicU64::new(0);

/// Zeroes the sums and starts (`true`) or stops summing. One clock per process: products timed
/// on several threads at once would overlap in it (the engine calls them from one thread).
pub fn set(on: bool) {
    NANOS.store(0, Relaxed);
    FLOPS.store(0, Relaxed);
    ON.store(on, Relaxed);
}

/// Seconds and FLOPs summed since [`set`]`(true)`.
pub fn read() -> (f64, f64) {
    (NANOS.load(Relaxed) as f64 * 1e-9, FLOPS.load(Relaxed) as f64)
}

/// Runs `f`, adding its wall time and `flops` to the sums when the clock is on.
pub(crate) fn time<R>(flops: usize, f: impl FnOnce() -> R) -> R {
    if !ON.load(Relaxed) {
        return f();
    }
    let start = std::time::Instant::now();
    let result = f();
    NANOS.fetch_add(start.elapsed().as_nanos() as u64, Relaxed);
    FLOPS.fetch_add(flops as u64, Relaxed);
    result
}
