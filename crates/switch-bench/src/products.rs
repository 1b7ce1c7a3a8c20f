//! `switch-bench products`: the dense model's parameter products by themselves, as the engine
//! runs them (`param_matmul_fused`, forward and backward, timed by the product clock), on one
//! batch's encoder tokens of the comparison shape (2 threads) and of the `tiny` preset (1
//! thread), beside the same products in a training step of that preset's dense model (its
//! product clock over the whole step: the decoder's and the output layer's products too). Each
//! product runs twice a round: once right after the same product ran (its operands
//! left in the caches) and once after evicting the caches before the forward and again before
//! the backward (its operands in memory), beside gemm 0.19's 1024³ matmul measured in the same
//! round. It tells how much of the gap between a step's products and matmul is their shapes and
//! how much the memory they read.
use crate::engine;
use dfdx::prelude::*;
use rayon::prelude::*;
use std::path::Path;
use switch_model::kernels::{param_matmul_fused, product_clock, Stacked};
use switch_runner::config::RunConfig;
use switch_runner::train::{to_batch, train_step};

/// (preset, threads, config) of the two rows `engine` measures dense.
fn presets() -> anyhow::Result<Vec<(&'static str, usize, RunConfig)>> {
    let recipe = engine::recipe_named("adamw", "f32", "fused_slots")?;
    Ok(vec![("shape", 2, engine::config(false, 1, recipe)?), ("tiny", 1, engine::config(true, 1, recipe)?)])
}

type Input = Tensor<(usize, usize, usize), f32, Cpu>;

/// Seconds the product clock counted in one forward and backward pass of `x · W`, and their
/// FLOPs. With `evict`, the caches are evicted before the forward and again before the backward
/// (after the loss), so both passes find their operands in memory, as in a step.
fn clocked(x: &Input, w: &Tensor<(usize,), f32, Cpu>, layout: Stacked, evict: Option<&[f32]>) -> (f64, f64) {
    if let Some(buffer) = evict {
        evict_caches(buffer);
    }
    product_clock::set(true);
    let y = param_matmul_fused(x.clone().leaky_traced(), w, layout);
    let forward = product_clock::read();
    let loss = y.sum();
    if let Some(buffer) = evict {
        evict_caches(buffer);
    }
    product_clock::set(true); // zeroes the sums
    std::hint::black_box(loss.backward());
    let backward = product_clock::read();
    product_clock::set(false);
    (forward.0 + backward.0, forward.1 + backward.1)
}

/// Reads all of `buffer` (larger than the caches) on every thread of the pool, so each core's
/// caches hold its clean lines and nothing of the products' operands; reading leaves no dirty
/// lines for the next product to write back.
fn evict_caches(buffer: &[f32]) {
    let sum: f32 = buffer.par_chunks(1 << 16).map(|c| c.iter().sum::<f32>()).sum();
    std::hint::black_box(sum);
}

/// One round's FLOP/s.
struct Round {
    /// gemm 0.19's 1024³ matmul.
    matmul: f64,
    /// The products alone, right after the same product ran.
    warm: f64,
    /// The products alone, after evicting the caches.
    cold: f64,
    /// All products of a training step of the preset's dense model.
    step: f64,
}

pub fn run(rounds: usize, evict_mib: usize) -> anyhow::Result<()> {
    anyhow::ensure!(rounds >= 1, "--rounds {rounds}: at least 1");
    // Ones, not zeros: a zeroed allocation maps one shared zero page, which reading would not
    // bring through the caches.
    let evict = vec![1f32; evict_mib << 18];
    println!(
        "the dense parameter products (forward, ∂x, ∂W) by themselves, and those of a training step, ÷ gemm 0.19's \
         1024³ matmul measured in the same round, medians of {rounds} rounds; warm: right after the same product; \
         cold: after reading {evict_mib} MiB on every thread before the forward and again before the backward"
    );
    for (preset, threads, cfg) in presets()? {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
        let rows = pool.install(|| measure(&cfg, rounds, &evict))?;
        let median = |f: &dyn Fn(&Round) -> f64| engine::quantile(&rows.iter().map(f).collect::<Vec<_>>(), 0.5);
        println!(
            "{preset:<6} {threads} thr, {} tokens × d_model {}, d_ff {}: matmul {:.0} GFLOP/s; products warm {:.0} \
             = {:.2} of matmul, cold {:.0} = {:.2}, in a training step {:.0} = {:.2}; cold ÷ warm time {:.2}",
            cfg.train.batch_size * cfg.data.encoder_len,
            cfg.model.d_model,
            cfg.model.d_ff,
            median(&|r| r.matmul) / 1e9,
            median(&|r| r.warm) / 1e9,
            median(&|r| r.warm / r.matmul),
            median(&|r| r.cold) / 1e9,
            median(&|r| r.cold / r.matmul),
            median(&|r| r.step) / 1e9,
            median(&|r| r.step / r.matmul),
            median(&|r| r.warm / r.cold),
        );
    }
    Ok(())
}

/// `rounds` rounds of `cfg`'s dense products on the current pool: the matmul, the products alone
/// cold and warm, then a training step.
fn measure(cfg: &RunConfig, rounds: usize, evict: &[f32]) -> anyhow::Result<Vec<Round>> {
    let (tokens, d, f) = (cfg.train.batch_size * cfg.data.encoder_len, cfg.model.d_model, cfg.model.d_ff);
    let data = switch_runner::sweep::datasets(&[&cfg.data], Path::new("results"))?;
    let ds = data.values().next().expect("one dataset");
    let (a, b) = engine::square_operands();
    let dev = Cpu::default();
    dev.enable_cache();
    let shapes = [(d, d), (d, f), (f, d)].map(|(k, m)| {
        let x: Input = dev.sample_normal_like(&(1, tokens, k));
        let w: Tensor<(usize,), f32, Cpu> = dev.sample_normal_like(&(k * m,));
        (x, w, Stacked { experts: 1, k, m, transposed: false })
    });
    for (x, w, layout) in &shapes {
        clocked(x, w, *layout, None); // first use: the buffers into dfdx's cache
    }
    let batch = |s: usize| to_batch(ds.train_batch(0, s as u64, cfg.train.batch_size), cfg);
    let (mut model, mut opt) = engine::warmed_up(cfg, &batch(0), true)?;
    let mut rows = Vec::new();
    for round in 1..=rounds {
        let matmul = engine::engine_matmul_flops_per_s(&a, &b);
        let (mut warm, mut cold, mut flops) = (0.0, 0.0, 0.0);
        for (x, w, layout) in &shapes {
            let (s, fl) = clocked(x, w, *layout, Some(evict));
            (cold, flops) = (cold + s, flops + fl);
            warm += clocked(x, w, *layout, None).0;
        }
        let step_batch = batch(round);
        product_clock::set(true);
        train_step(&mut model, &mut opt, &step_batch, cfg, round as u64)?;
        let (step_s, step_flops) = product_clock::read();
        product_clock::set(false);
        rows.push(Round { matmul, warm: flops / warm, cold: flops / cold, step: step_flops / step_s });
    }
    Ok(rows)
}
