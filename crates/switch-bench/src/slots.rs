//! `switch-bench slots`: the experts' products as `fused_router` runs them (gemm over every
//! capacity slot) against `fused_slots` (the engine's own loops where they beat gemm, and only the
//! slots up to each expert's last filled one), forward and backward, on the `tiny` preset's
//! expert shapes, one thread, the two interleaved round by round.
use dfdx::prelude::*;
use std::time::Instant;
use switch_model::kernels::{expert_matmul_fused, param_matmul_fused, slots, Stacked};

/// (experts, slots per expert, k, m): the `tiny` preset's up and down products at 64 and 128
/// experts, in the encoder (2,048 tokens a batch) and the decoder (~450).
const SHAPES: [(usize, usize, usize, usize); 6] = [
    (128, 20, 64, 256),
    (128, 20, 256, 64),
    (128, 5, 64, 256),
    (128, 5, 256, 64),
    (64, 40, 64, 256),
    (64, 40, 256, 64),
];

/// Seconds of one forward and backward pass of `x · W` through `product`.
fn timed(
    dev: &Cpu,
    (e, c, k, m): (usize, usize, usize, usize),
    product: &dyn Fn(
        Tensor<(usize, usize, usize), f32, Cpu, OwnedTape<f32, Cpu>>,
        &Tensor<(usize,), f32, Cpu>,
    ) -> Tensor<(usize, usize, usize), f32, Cpu, OwnedTape<f32, Cpu>>,
) -> f64 {
    let x: Tensor<(usize, usize, usize), f32, Cpu> = dev.sample_normal_like(&(e, c, k));
    let w: Tensor<(usize,), f32, Cpu> = dev.sample_normal_like(&(e * k * m,));
    let t = Instant::now();
    let y = product(x.leaky_traced(), &w);
    std::hint::black_box(y.sum().backward());
    t.elapsed().as_secs_f64()
}

pub fn run(rounds: usize, in_use_fraction: f64) -> anyhow::Result<()> {
    anyhow::ensure!((0.0..=1.0).contains(&in_use_fraction), "--in-use {in_use_fraction}: a fraction in [0, 1]");
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    println!(
        "the experts' products, forward and backward, 1 thread, median of {rounds} interleaved rounds; AVX-512F: {}; \
         fused_slots with {:.0}% of each expert's slots in use",
        slots::available(),
        100.0 * in_use_fraction
    );
    pool.install(|| {
        let dev = Cpu::default();
        dev.enable_cache();
        for shape @ (e, c, k, m) in SHAPES {
            let layout = Stacked { experts: e, k, m, transposed: false };
            let in_use = vec![((c as f64 * in_use_fraction).round() as usize).min(c); e];
            let (mut gemm, mut own) = (Vec::new(), Vec::new());
            for _ in 0..rounds + 1 {
                gemm.push(timed(&dev, shape, &|x, w| param_matmul_fused(x, w, layout)));
                own.push(timed(&dev, shape, &|x, w| expert_matmul_fused(x, w, layout, &in_use)));
            }
            let (gemm, own) = (crate::engine::quantile(&gemm[1..], 0.5), crate::engine::quantile(&own[1..], 0.5));
            let gflops = |s: f64| 3.0 * 2.0 * (e * c * k * m) as f64 / s / 1e9;
            println!(
                "{e:>4} experts × {c:>2} slots, {k:>3} → {m:>3}: fused_router {:>6.1} GFLOP/s, fused_slots {:>6.1} (every slot counted): ×{:.2}",
                gflops(gemm),
                gflops(own),
                gemm / own
            );
        }
    });
    Ok(())
}
