//! `switch-bench engine`: the training engine's speed on this machine, in one process — tokens/s
//! of real training steps, model FLOPs/s ÷ the best f32 matmul FLOPs/s, Switch ÷ dense step time at
//! equal FLOPs per token, kernel ÷ user CPU time, and peak resident memory per run.
use dfdx::prelude::*;
use std::path::Path;
use std::time::Instant;
use switch_data::{Dataset, TokenizerKind};
use switch_model::kernels::{param_matmul_fused, product_clock, KernelMode, Stacked};
use switch_model::{Batch, ModelConfig, SwitchTransformer};
use switch_runner::config::MomentPrecision;
use switch_runner::config::OptimizerKind;
use switch_runner::train::{optimizer_for, to_batch, train_step, Dev, OptimizerState};
use switch_runner::RunConfig;

use crate::child::{self, Measured, PairRatios};
use crate::pytorch::Torch;

/// The comparison shape: d_model 256, d_ff 1024, 4 heads of 64, 2+2 layers, byte vocabulary,
/// 16 × 128 encoder tokens, capacity factor 1.0, experts in every feed-forward layer.
pub(crate) fn shape(num_experts: usize) -> RunConfig {
    let mut c = RunConfig::default();
    c.data.tokenizer = TokenizerKind::Byte;
    c.data.encoder_len = 128;
    c.model = ModelConfig {
        d_model: 256,
        d_ff: 1024,
        num_heads: 4,
        d_kv: 64,
        num_encoder_layers: 2,
        num_decoder_layers: 2,
        expert_every: 1,
        num_experts,
        capacity_factor: 1.0,
        group_size: Some(16),
        ..Default::default()
    };
    c.model.vocab_size = c.data.model_vocab_size();
    c.train.batch_size = 16;
    c
}

/// CPU time of this process so far, (user, kernel) seconds (0 where /proc cannot be read).
fn cpu_times() -> (f64, f64) {
    switch_model::procfs::cpu_times().unwrap_or((0.0, 0.0))
}

/// A field of /proc/self/status in bytes (`VmRSS`: resident now, `VmHWM`: peak resident).
fn status_bytes(field: &str) -> u64 {
    switch_model::procfs::status_bytes(None, field).unwrap_or(0)
}

/// A model of `cfg` and its optimizer on a new device (dfdx's buffer cache on or off), after one
/// warm-up step on `first` (which allocates the optimizer's moments and fills the cache).
pub(crate) fn warmed_up(
    cfg: &RunConfig,
    first: &Batch,
    cache: bool,
) -> anyhow::Result<(SwitchTransformer<Dev>, OptimizerState)> {
    let dev = Dev::default();
    if cache {
        dev.enable_cache();
    }
    let mut model = SwitchTransformer::new(&dev, &cfg.model, 0)?;
    let mut opt = optimizer_for(cfg, &mut model);
    train_step(&mut model, &mut opt, first, cfg, 0)?;
    Ok((model, opt))
}

/// Trains `steps` real steps of `cfg` (after one warm-up step) on `threads` threads.
fn measure(cfg: &RunConfig, ds: &Dataset, threads: usize, steps: u64, cache: bool) -> anyhow::Result<Measured> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    pool.install(|| {
        let batches: Vec<_> = (0..=steps).map(|s| to_batch(ds.train_batch(0, s, cfg.train.batch_size), cfg)).collect();
        let base_rss = status_bytes("VmRSS");
        let (mut model, mut opt) = warmed_up(cfg, &batches[0], cache)?;
        let (u0, s0) = cpu_times();
        product_clock::set(true);
        let t = Instant::now();
        for (s, b) in batches.iter().enumerate().skip(1) {
            train_step(&mut model, &mut opt, b, cfg, s as u64)?;
        }
        let secs = t.elapsed().as_secs_f64();
        let (product_s, product_flops) = product_clock::read();
        product_clock::set(false);
        let (u1, s1) = cpu_times();
        let (le, ld) = cfg.lengths();
        let accounting = cfg.accounting();
        Ok(Measured {
            tokens_per_s: (cfg.train.batch_size * (le + ld)) as f64 * steps as f64 / secs,
            step_s: secs / steps as f64,
            sys_over_user: (s1 - s0) / (u1 - u0).max(1e-9),
            peak_rss: status_bytes("VmHWM"),
            base_rss,
            params: accounting.params_total,
            flops_per_token: accounting.flops_per_token,
            product_s: product_s / steps as f64,
            product_flops: product_flops / steps as f64,
        })
    })
}

/// The config of a measured run: the comparison shape, or the `tiny` preset in the paper's recipe
/// (`experts-recipe.yaml`'s dense point: span corruption, experts every other FFN), with
/// `num_experts` experts, trained with `recipe`'s optimizer and kernels.
pub(crate) fn config(tiny: bool, num_experts: usize, recipe: Recipe) -> anyhow::Result<RunConfig> {
    let mut c = if tiny {
        switch_runner::plan(Path::new("experiments/experts-recipe.yaml"))?.runs[0].config.clone()
    } else {
        shape(num_experts)
    };
    c.model.num_experts = num_experts;
    (c.train.optimizer, c.train.kernels) = (recipe.optimizer, recipe.kernels);
    c.train.optimizer_moments = recipe.moments;
    Ok(c)
}

/// What a measured run trains with, besides its shape.
#[derive(Clone, Copy, Debug)]
pub struct Recipe {
    pub optimizer: OptimizerKind,
    pub moments: MomentPrecision,
    pub kernels: KernelMode,
}

impl Recipe {
    /// The command-line arguments [`recipe_named`] reads back.
    fn args(&self) -> [String; 6] {
        let name = |v: serde_json::Value| v.as_str().expect("a unit variant").to_string();
        [
            "--optimizer".into(),
            name(serde_json::to_value(self.optimizer).expect("serializable")),
            "--moments".into(),
            name(serde_json::to_value(self.moments).expect("serializable")),
            "--kernels".into(),
            name(serde_json::to_value(self.kernels).expect("serializable")),
        ]
    }
}

/// The recipe named on `engine-run`'s and `engine-pairs`' command lines, as a grid names them
/// (`adamw`/`adafactor`, `f32`/`bf16`, `fused`/`plain`/`fused_router`/`fused_slots`).
pub fn recipe_named(optimizer: &str, moments: &str, kernels: &str) -> anyhow::Result<Recipe> {
    // serde's own error lists the allowed values (`unknown variant …, expected one of …`).
    fn named<V: serde::de::DeserializeOwned>(flag: &str, v: &str) -> anyhow::Result<V> {
        serde_json::from_value(serde_json::Value::String(v.into())).map_err(|e| anyhow::anyhow!("{flag} {v}: {e}"))
    }
    Ok(Recipe {
        optimizer: named("--optimizer", optimizer)?,
        moments: named("--moments", moments)?,
        kernels: named("--kernels", kernels)?,
    })
}

/// One measured run, in this process: prints its `Measured` as one line of JSON (what `child`
/// reads back).
pub fn run_one(
    tiny: bool,
    num_experts: usize,
    threads: usize,
    steps: u64,
    cache: bool,
    recipe: Recipe,
) -> anyhow::Result<()> {
    let cfg = config(tiny, num_experts, recipe)?;
    let ds = switch_runner::sweep::datasets(&[&cfg.data], Path::new("results"))?;
    let ds = ds.into_values().next().expect("dataset");
    child::emit(&measure(&cfg, &ds, threads, steps, cache)?)
}

/// Switch ÷ dense step times of the comparison shape (or the `tiny` preset), measured with a dense and a Switch model
/// in this process, their steps alternating (dense, Switch, dense, …; one warm-up step each): each
/// ratio compares two steps a second apart, so the drift of a shared machine's speed cancels.
/// Prints them as one line of JSON, a `PairRatios`.
pub fn run_pairs(
    tiny: bool,
    num_experts: usize,
    threads: usize,
    pairs: u64,
    cache: bool,
    recipe: Recipe,
) -> anyhow::Result<()> {
    let configs = [config(tiny, 1, recipe)?, config(tiny, num_experts, recipe)?];
    let ds = switch_runner::sweep::datasets(&[&configs[0].data], Path::new("results"))?;
    let ds = ds.into_values().next().expect("dataset");
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    let ratios = pool.install(|| -> anyhow::Result<Vec<f64>> {
        let cfg = &configs[0];
        let batches: Vec<_> = (0..=pairs).map(|s| to_batch(ds.train_batch(0, s, cfg.train.batch_size), cfg)).collect();
        let mut trainers = Vec::new();
        for cfg in &configs {
            let (model, opt) = warmed_up(cfg, &batches[0], cache)?;
            trainers.push((model, opt, cfg));
        }
        let mut ratios = Vec::new();
        for (s, b) in batches.iter().enumerate().skip(1) {
            let mut secs = [0.0; 2];
            for (t, (model, opt, cfg)) in trainers.iter_mut().enumerate() {
                let start = Instant::now();
                train_step(model, opt, b, cfg, s as u64)?;
                secs[t] = start.elapsed().as_secs_f64();
            }
            ratios.push(secs[1] / secs[0]);
        }
        Ok(ratios)
    })?;
    child::emit(&PairRatios { ratios })
}

/// Runs `run_pairs` in a child process with `engine`'s kernels: the Switch ÷ dense ratios.
fn pair_child(tiny: bool, num_experts: usize, threads: usize, pairs: u64, engine: Engine) -> anyhow::Result<Vec<f64>> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(["engine-pairs", "--experts", &num_experts.to_string(), "--threads", &threads.to_string()])
        .args(["--pairs", &pairs.to_string(), "--cache", if engine.cache { "on" } else { "off" }])
        .args(engine.recipe.args())
        .args(tiny.then_some("--tiny"))
        .env("RAYON_NUM_THREADS", threads.to_string())
        .output()?;
    let PairRatios { ratios } = child::parse("benchmark pair run", &out)?;
    anyhow::ensure!(!ratios.is_empty(), "benchmark pair run failed: no ratios");
    Ok(ratios)
}

/// Runs `run_one` in a child process, so that its peak memory and CPU times are its own.
pub(crate) fn child(
    tiny: bool,
    num_experts: usize,
    threads: usize,
    steps: u64,
    engine: Engine,
) -> anyhow::Result<Measured> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(["engine-run", "--experts", &num_experts.to_string(), "--threads", &threads.to_string()])
        .args(["--steps", &steps.to_string(), "--cache", if engine.cache { "on" } else { "off" }])
        .args(engine.recipe.args())
        .args(tiny.then_some("--tiny"))
        .env("RAYON_NUM_THREADS", threads.to_string())
        .output()?;
    child::parse("benchmark run", &out)
}

/// f32 matmul FLOP/s at 1024³ on `threads` threads: (dfdx 0.13's matmul, gemm 0.15; the engine's
/// `param_matmul`, gemm 0.19).
pub fn matmul_flops_per_s(threads: usize) -> (f64, f64) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
    pool.install(|| {
        let (a, b) = square_operands();
        let dfdx = time_matmul(&|| {
            std::hint::black_box(a.clone().matmul(b.clone()));
        });
        (dfdx, engine_matmul_flops_per_s(&a, &b))
    })
}

const MATMUL_N: usize = 1024;

pub(crate) type Square = Tensor<(usize, usize), f32, Cpu>;

pub(crate) fn square_operands() -> (Square, Square) {
    let dev: Cpu = Default::default();
    (dev.sample_normal_like(&(MATMUL_N, MATMUL_N)), dev.sample_normal_like(&(MATMUL_N, MATMUL_N)))
}

/// FLOP/s of `f`, one 1024³ product, over 5 repetitions after a warm-up one.
fn time_matmul(f: &dyn Fn()) -> f64 {
    f();
    let (t, reps) = (Instant::now(), 5);
    for _ in 0..reps {
        f();
    }
    reps as f64 * 2.0 * (MATMUL_N as f64).powi(3) / t.elapsed().as_secs_f64()
}

/// The engine's f32 matmul FLOP/s at 1024³ on `threads` threads, the faster of one measured just
/// before `f` and one just after, in this process while `f`'s child process runs alone (no pool
/// of this process is alive meanwhile): the VM's speed drifts between minutes, and this is the
/// matmul beside a row's steps.
pub(crate) fn with_matmul_beside<R>(threads: usize, f: impl FnOnce() -> anyhow::Result<R>) -> anyhow::Result<(R, f64)> {
    let (a, b) = square_operands();
    let gemm = || -> anyhow::Result<f64> {
        Ok(rayon::ThreadPoolBuilder::new().num_threads(threads).build()?.install(|| engine_matmul_flops_per_s(&a, &b)))
    };
    let before = gemm()?;
    let r = f()?;
    Ok((r, before.max(gemm()?)))
}

/// The opening matmuls of a bench run on one thread count: the fastest of them, and gemm 0.19's.
#[derive(Clone, Copy)]
pub(crate) struct Matmul {
    best: f64,
    gemm: f64,
}

impl Matmul {
    /// What a row's "÷ matmul" divides by: the fastest opening matmul, scaled up by as much as
    /// gemm 0.19 ran faster beside the row (`gemm_beside`) than at the opening, so a machine that
    /// sped up after the opening cannot inflate a ratio.
    pub(crate) fn beside(&self, gemm_beside: f64) -> f64 {
        self.best * (gemm_beside / self.gemm).max(1.0)
    }
}

/// The engine's f32 matmul FLOP/s at 1024³ (`param_matmul`, gemm 0.19) on the current thread pool.
pub(crate) fn engine_matmul_flops_per_s(a: &Square, b: &Square) -> f64 {
    let n = MATMUL_N;
    let flat_b = b.clone().reshape_like(&(n * n,));
    time_matmul(&|| {
        std::hint::black_box(param_matmul_fused(a.clone().reshape_like(&(1, n, n)), &flat_b, Stacked::matrix(n, n)));
    })
}

/// Prints the f32 matmul FLOP/s at 1024³ on `threads` threads of dfdx 0.13, of the engine and,
/// when installed, of PyTorch; returns the fastest (what "÷ matmul" divides by) and gemm 0.19's.
pub(crate) fn best_matmul(threads: usize, torch: Option<&Torch>) -> anyhow::Result<Matmul> {
    let (dfdx, engine) = matmul_flops_per_s(threads);
    let pytorch = torch.map(|t| t.matmul_flops_per_s(threads)).transpose()?;
    let candidates = [("dfdx's gemm 0.15", dfdx), ("gemm 0.19", engine), ("PyTorch", pytorch.unwrap_or(0.0))];
    let (fastest, best) = candidates.into_iter().fold(("", 0.0), |a, c| if c.1 > a.1 { c } else { a });
    println!(
        "f32 matmul 1024³ on {threads} thread(s), GFLOP/s: dfdx 0.13 (gemm 0.15) {:.1}, the engine's (gemm 0.19) {:.1}, PyTorch {}; ÷ matmul on {threads} thread(s) divides by {fastest}'s",
        dfdx / 1e9,
        engine / 1e9,
        pytorch.map_or("not installed".to_string(), |p| format!("{:.1}", p / 1e9))
    );
    Ok(Matmul { best, gemm: engine })
}

/// Memory bandwidth in bytes/s on `threads` threads: STREAM's triad `a = b + s·c` over three
/// 64 MiB arrays (far beyond the caches), counting 12 bytes per element and taking the fastest
/// repetition, as STREAM does.
pub fn memory_bandwidth(threads: usize) -> f64 {
    use rayon::prelude::*;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
    pool.install(|| {
        let n = 16 << 20;
        let (b, c) = (vec![1.0f32; n], vec![2.0f32; n]);
        let mut a = vec![0.0f32; n];
        let triad = |a: &mut [f32]| {
            a.par_chunks_mut(1 << 16).zip(b.par_chunks(1 << 16)).zip(c.par_chunks(1 << 16)).for_each(|((a, b), c)| {
                for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                    *a = b + 0.5 * c;
                }
            })
        };
        triad(&mut a);
        // The fastest of ten, as STREAM reports: on a shared machine a slow repetition measures
        // the neighbours, and a floor from it would overshoot.
        let fastest = (0..10)
            .map(|_| {
                let t = Instant::now();
                triad(std::hint::black_box(&mut a));
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        (12 * n) as f64 / fastest
    })
}

/// Bytes a training step moves per parameter of a weight matrix too large for the caches, at
/// the least: the forward and the ∂x products each read the weight (4 + 4), the ∂W product writes
/// its gradient (4), the global gradient norm reads it (4), and the optimizer — f32 AdamW reads
/// weight, gradient and both moments and writes three of them (28); Adafactor, whose second
/// moment of a large matrix is a row and a column, reads the gradient for them and the weight for
/// its RMS (8), the gradient again for the update's RMS (4), then weight and gradient to write the
/// weight (12). None of this traffic can overlap the products that need its results.
fn step_bytes_per_param(optimizer: OptimizerKind, moments: MomentPrecision) -> f64 {
    16.0 + optimizer_bytes_per_param(optimizer, moments)
}

/// The optimizer's share of [`step_bytes_per_param`] (the bytes `switch-bench optimizer` times).
pub(crate) fn optimizer_bytes_per_param(optimizer: OptimizerKind, moments: MomentPrecision) -> f64 {
    match (optimizer, moments) {
        (OptimizerKind::Adamw, MomentPrecision::F32) => 28.0,
        // bf16 m and v: 2 + 2 bytes read, 2 + 2 written.
        (OptimizerKind::Adamw, MomentPrecision::Bf16) => 20.0,
        (OptimizerKind::Adafactor, _) => 24.0,
    }
}

/// The `q` quantile of `x`, interpolated between the two nearest ranks (so the median of an even
/// count is the mean of the middle two, not the upper one).
pub(crate) fn quantile(x: &[f64], q: f64) -> f64 {
    let mut x = x.to_vec();
    x.sort_by(f64::total_cmp);
    let at = (x.len() - 1) as f64 * q;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    x[lo] + (x[hi] - x[lo]) * (at - lo as f64)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// A row's figures, each "÷ matmul" divided by `matmul` FLOP/s.
fn line(name: &str, threads: usize, m: &Measured, matmul: f64) {
    println!(
        "{name:<30} {threads} thr {:>7.0} tokens/s  step {:>7.1} ms  FLOPs/s ÷ matmul {:.3} (of {:.0} GFLOP/s)  sys ÷ user {:.3}  peak RSS {:>5.0} MiB ({:>5.0} MiB above data) = {:.2} × 16 B/param",
        m.tokens_per_s,
        m.step_s * 1e3,
        3.0 * m.flops_per_token * m.tokens_per_s / matmul,
        matmul / 1e9,
        m.sys_over_user,
        mib(m.peak_rss),
        mib(m.peak_rss.saturating_sub(m.base_rss)),
        m.peak_rss.saturating_sub(m.base_rss) as f64 / (16 * m.params) as f64
    );
    if m.product_s > 0.0 {
        // FLOPs/s ÷ matmul = (model FLOPs ÷ products' FLOPs) × (products' time ÷ step) × (products' rate ÷ matmul).
        println!(
            "{:<30} parameter products: {:.0}% of the step, {:.0} GFLOP/s = {:.2} of matmul (the rest: {:.1} ms; model FLOPs ÷ products' {:.2})",
            "",
            100.0 * m.product_s / m.step_s,
            m.product_flops / m.product_s / 1e9,
            m.product_flops / m.product_s / matmul,
            (m.step_s - m.product_s) * 1e3,
            3.0 * m.flops_per_token * m.tokens_per_s * m.step_s / m.product_flops
        );
    }
}

/// One configuration of the engine: dfdx's buffer cache on or off, and what it trains with.
#[derive(Clone, Copy)]
pub(crate) struct Engine {
    cache: bool,
    recipe: Recipe,
    name: &'static str,
}

/// Prints every figure of the engine benchmark for the engine as `switchlab sweep` trains
/// (`fused_slots`, buffer cache on), with bf16 moments, with `fused` and `fused_router` (every
/// expert slot through gemm), with Adafactor instead of AdamW, without the fused kernels, and as
/// plain dfdx (no cache), side by side, each run in its
/// own process; with `torch`, PyTorch's matmul among the matmuls and, after the training engine's
/// rows, [`crate::pytorch::compare`] (three more rounds of switchlab and PyTorch runs).
pub fn run(steps: u64, pairs: u64, only_training: bool, torch: Option<&Torch>) -> anyhow::Result<()> {
    anyhow::ensure!(pairs >= 1, "--pairs must be at least 1");
    let (matmul2, matmul1) = (best_matmul(2, torch)?, best_matmul(1, torch)?);
    let (bandwidth, bandwidth1) = (memory_bandwidth(2), memory_bandwidth(1));
    println!(
        "memory bandwidth (STREAM triad), 2 threads / 1 thread: {:.1} / {:.1} GB/s",
        bandwidth / 1e9,
        bandwidth1 / 1e9
    );
    match torch {
        Some(t) => println!("PyTorch and transformers {} (from {})", t.versions, t.python.display()),
        None => println!(
            "PyTorch: not found (no --python, and {} cannot import torch and transformers; `just bench-pytorch` installs them there), so its figures are left out",
            crate::pytorch::VENV_PYTHON
        ),
    }
    println!("FLOPs/s ratios of the engine's rows are ÷ the fastest of these matmuls, scaled up by as much as gemm 0.19 ran faster just before or just after the row's own run than here (each row prints its divisor); those beside PyTorch likewise, with gemm 0.19 measured beside each pair of runs");
    println!("FLOPs/s = 3 × forward FLOPs per token × tokens/s; {steps} steps after a warm-up step; peak RSS ÷ (weights + gradients + Adam m, v) counts the memory above the data");
    println!("Switch ÷ dense: a dense and a Switch model in one process, their steps alternating, one ratio per pair of steps (this machine's speed drifts by ±15% between minutes, which separate runs would measure)\n");
    let plain = Recipe { kernels: KernelMode::Plain, ..TRAINING.recipe };
    let engines = [
        Engine {
            name: "fused kernels, the experts' products over their filled slots (`fused_slots`), dfdx buffer cache on (as `switchlab sweep` trains)",
            ..TRAINING
        },
        Engine {
            recipe: Recipe { moments: MomentPrecision::Bf16, ..TRAINING.recipe },
            name: "the same with AdamW's moments in bf16 (`train.optimizer_moments: bf16`, not the default)",
            ..TRAINING
        },
        Engine {
            recipe: Recipe { kernels: KernelMode::Fused, ..TRAINING.recipe },
            name: "the same with every expert slot through gemm and the router unfused (`train.kernels: fused`, the default until 2026-12-06)",
            ..TRAINING
        },
        Engine {
            recipe: Recipe { kernels: KernelMode::FusedRouter, ..TRAINING.recipe },
            name: "the same with the router fused, every expert slot through gemm (`train.kernels: fused_router`)",
            ..TRAINING
        },
        Engine {
            recipe: Recipe { optimizer: OptimizerKind::Adafactor, ..TRAINING.recipe },
            name: "the same with Adafactor (the paper's optimizer; `train.optimizer: adafactor`)",
            ..TRAINING
        },
        Engine { recipe: plain, name: "plain dfdx ops, buffer cache on", ..TRAINING },
        Engine { cache: false, recipe: plain, name: "plain dfdx ops, buffer cache off (dfdx's default)" },
    ];
    let comparison = Preset { tiny: false, threads: 2, experts: [8, 64], matmul: matmul2, bandwidth };
    let tiny = Preset { tiny: true, threads: 1, experts: [64, 128], matmul: matmul1, bandwidth: bandwidth1 };
    for (i, engine) in engines.into_iter().enumerate() {
        println!("{}:", engine.name);
        for preset in [&comparison, &tiny] {
            preset_rows(preset, engine, steps, pairs)?;
        }
        println!();
        if let (Some(torch), 0) = (torch, i) {
            crate::pytorch::compare(torch, steps, 3, matmul2)?;
            println!();
        }
        if only_training && engine.recipe.kernels == KernelMode::FusedRouter {
            break;
        }
    }
    Ok(())
}

/// Where the engine's rows run: the comparison shape on 2 threads or the `tiny` preset on 1, with
/// that thread count's matmul and memory bandwidth.
struct Preset {
    tiny: bool,
    threads: usize,
    experts: [usize; 2],
    matmul: Matmul,
    bandwidth: f64,
}

/// The rows of one preset: dense, then each Switch size with its interleaved ratio to dense.
fn preset_rows(p: &Preset, engine: Engine, steps: u64, pairs: u64) -> anyhow::Result<()> {
    let (name, switch_note) = if p.tiny { ("tiny preset", "") } else { ("shape", " (every layer)") };
    let (dense, beside) = with_matmul_beside(p.threads, || child(p.tiny, 1, p.threads, steps, engine))?;
    line(&format!("{name}, dense"), p.threads, &dense, p.matmul.beside(beside));
    for e in p.experts {
        let (switch, beside) = with_matmul_beside(p.threads, || child(p.tiny, e, p.threads, steps, engine))?;
        line(&format!("{name}, Switch-{e}{switch_note}"), p.threads, &switch, p.matmul.beside(beside));
        let ratios = pair_child(p.tiny, e, p.threads, pairs, engine)?;
        // The extra parameters' memory traffic at the measured bandwidth: no kernel can bring the
        // ratio below this while every parameter is updated each step.
        ratio_line(e, &ratios, floor_ratio(&dense, &switch, engine, p.bandwidth));
    }
    Ok(())
}

/// The Switch ÷ dense step-time ratio below which no kernel can go while every parameter is
/// updated each step: the dense step plus the extra parameters' memory traffic at `bandwidth`.
fn floor_ratio(dense: &Measured, switch: &Measured, engine: Engine, bandwidth: f64) -> f64 {
    let extra = (switch.params - dense.params) as f64
        * step_bytes_per_param(engine.recipe.optimizer, engine.recipe.moments)
        / bandwidth;
    (dense.step_s + extra) / dense.step_s
}

fn ratio_line(experts: usize, ratios: &[f64], floor: f64) {
    println!(
        "{:<30} Switch-{experts} ÷ dense step time at equal FLOPs per token, {} step pairs interleaved in one process: median {:.2}, quartiles {:.2}–{:.2} (floor from the extra parameters' memory traffic: {floor:.2})",
        "",
        ratios.len(),
        quantile(ratios, 0.5),
        quantile(ratios, 0.25),
        quantile(ratios, 0.75),
    );
}

/// The engine as `switchlab sweep` trains: its default kernels (`fused_slots`), dfdx's buffer
/// cache on, AdamW.
pub(crate) const TRAINING: Engine = Engine {
    cache: true,
    recipe: Recipe { optimizer: OptimizerKind::Adamw, moments: MomentPrecision::F32, kernels: KernelMode::FusedSlots },
    name: "training",
};

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_interpolate_between_ranks() {
        assert_eq!(quantile(&[2.0, 1.0], 0.5), 1.5, "the median of two is their mean");
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), 2.0);
        let eight = [8.0, 1.0, 7.0, 2.0, 6.0, 3.0, 5.0, 4.0];
        assert_eq!([quantile(&eight, 0.25), quantile(&eight, 0.5), quantile(&eight, 0.75)], [2.75, 4.5, 6.25]);
        assert_eq!(quantile(&[0.9], 0.75), 0.9);
    }
}
