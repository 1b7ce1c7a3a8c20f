//! `switchlab bench engine`: the training engine's speed on this machine, in one process — tokens/s
//! of real training steps, model FLOPs/s ÷ the best f32 matmul FLOPs/s, Switch ÷ dense step time at
//! equal FLOPs per token, kernel ÷ user CPU time, and peak resident memory per run.
use dfdx::prelude::*;
use std::path::Path;
use std::time::Instant;
use switch_data::{Dataset, TokenizerKind};
use switch_model::{ModelConfig, SwitchTransformer};
use switch_runner::train::{to_batch, train_step, AdamW, Dev};
use switch_runner::RunConfig;

/// The comparison shape: d_model 256, d_ff 1024, 4 heads of 64, 2+2 layers, byte vocabulary,
/// 16 × 128 encoder tokens, capacity factor 1.0, experts in every feed-forward layer.
pub fn shape(num_experts: usize) -> RunConfig {
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

/// CPU time of this process so far, (user, kernel) seconds, from /proc/self/stat (clock ticks of
/// 1/100 s, Linux's USER_HZ).
fn cpu_times() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // fields after the ")" that ends the command name: state is field 3, utime 14, stime 15
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0.0)).collect();
    (f.get(11).copied().unwrap_or(0.0) / 100.0, f.get(12).copied().unwrap_or(0.0) / 100.0)
}

/// Peak resident memory since the last reset, bytes (VmHWM); `reset` starts a new peak.
fn peak_rss(reset: bool) -> u64 {
    if reset {
        let _ = std::fs::write("/proc/self/clear_refs", "5");
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.split_whitespace().next());
    kib.and_then(|k| k.parse::<u64>().ok()).unwrap_or(0) * 1024
}

pub struct Measured {
    pub tokens_per_s: f64,
    pub step_s: f64,
    pub sys_over_user: f64,
    pub peak_rss: u64,
    pub params: u64,
    pub flops_per_token: f64,
}

/// Trains `steps` real steps of `cfg` (after one warm-up step) on `threads` threads.
pub fn measure(cfg: &RunConfig, ds: &Dataset, threads: usize, steps: u64, cache: bool) -> anyhow::Result<Measured> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    pool.install(|| {
        peak_rss(true);
        let dev = Dev::default();
        if cache {
            dev.enable_cache();
        }
        let mut model = SwitchTransformer::new(&dev, &cfg.model, 0)?;
        let sizes: Vec<usize> = model.params_mut().iter().map(|(_, p)| p.shape().0).collect();
        let mut opt = AdamW::new(&sizes);
        let batches: Vec<_> = (0..=steps).map(|s| to_batch(ds.train_batch(0, s, cfg.train.batch_size), cfg)).collect();
        train_step(&mut model, &mut opt, &batches[0], cfg, 0)?;
        let (u0, s0) = cpu_times();
        let t = Instant::now();
        for (s, b) in batches.iter().enumerate().skip(1) {
            train_step(&mut model, &mut opt, b, cfg, s as u64)?;
        }
        let secs = t.elapsed().as_secs_f64();
        let (u1, s1) = cpu_times();
        let (le, ld) = cfg.lengths();
        let accounting = cfg.accounting();
        Ok(Measured {
            tokens_per_s: (cfg.train.batch_size * (le + ld)) as f64 * steps as f64 / secs,
            step_s: secs / steps as f64,
            sys_over_user: (s1 - s0) / (u1 - u0).max(1e-9),
            peak_rss: peak_rss(false),
            params: accounting.params_total,
            flops_per_token: accounting.flops_per_token,
        })
    })
}

/// f32 matmul FLOP/s of dfdx at 1024³ on `threads` threads (the fastest kernel this build has).
pub fn matmul_flops_per_s(threads: usize) -> f64 {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
    pool.install(|| {
        let dev: Cpu = Default::default();
        let n = 1024;
        let a: Tensor<(usize, usize), f32, Cpu> = dev.sample_normal_like(&(n, n));
        let b: Tensor<(usize, usize), f32, Cpu> = dev.sample_normal_like(&(n, n));
        let _ = a.clone().matmul(b.clone());
        let t = Instant::now();
        let reps = 5;
        for _ in 0..reps {
            std::hint::black_box(a.clone().matmul(b.clone()));
        }
        reps as f64 * 2.0 * (n * n * n) as f64 / t.elapsed().as_secs_f64()
    })
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn line(name: &str, threads: usize, m: &Measured, matmul: f64) {
    println!(
        "{name:<34} {threads} thr  {:>8.0} tokens/s  step {:>7.1} ms  model FLOPs/s ÷ matmul {:.3}  sys ÷ user {:.3}  peak RSS {:>6.0} MiB = {:.2} × (weights + grads + Adam m, v)",
        m.tokens_per_s,
        m.step_s * 1e3,
        3.0 * m.flops_per_token * m.tokens_per_s / matmul,
        m.sys_over_user,
        mib(m.peak_rss),
        m.peak_rss as f64 / (16 * m.params) as f64
    );
}

/// Prints every figure of the engine benchmark, with dfdx's buffer cache on (as training runs)
/// and off (dfdx's default) side by side.
pub fn run(steps: u64) -> anyhow::Result<()> {
    let results = Path::new("results");
    let dense = shape(1);
    let ds = switch_runner::sweep::datasets(&[&dense.data], results)?.into_values().next().expect("dataset");
    let tiny_plan = switch_runner::plan(Path::new("experiments/experts.yaml"))?;
    let tiny = tiny_plan.runs[0].config.clone();
    let tiny_ds = switch_runner::sweep::datasets(&[&tiny.data], results)?.into_values().next().expect("dataset");
    let matmul2 = matmul_flops_per_s(2);
    let matmul1 = matmul_flops_per_s(1);
    println!("f32 matmul 1024³: {:.1} GFLOP/s on 2 threads, {:.1} on 1", matmul2 / 1e9, matmul1 / 1e9);
    println!("model FLOPs/s = 3 × forward FLOPs per token × tokens/s; {steps} steps after one warm-up step\n");
    for cache in [true, false] {
        println!(
            "dfdx buffer cache {}:",
            if cache { "on (as `switchlab sweep` trains)" } else { "off (dfdx's default)" }
        );
        let d = measure(&dense, &ds, 2, steps, cache)?;
        line("shape, dense", 2, &d, matmul2);
        for e in [8, 64] {
            let s = measure(&shape(e), &ds, 2, steps, cache)?;
            line(&format!("shape, Switch-{e} (every layer)"), 2, &s, matmul2);
            println!("{:<34} Switch-{e} ÷ dense step time at equal FLOPs per token: {:.2}", "", s.step_s / d.step_s);
        }
        let t = measure(&tiny, &tiny_ds, 1, steps, cache)?;
        line("tiny preset, dense", 1, &t, matmul1);
        let mut tiny64 = tiny.clone();
        tiny64.model.num_experts = 64;
        let t64 = measure(&tiny64, &tiny_ds, 1, steps, cache)?;
        line("tiny preset, Switch-64", 1, &t64, matmul1);
        println!();
    }
    Ok(())
}
