//! `switch-bench sweep`, `data` and `report`: the sweep's parallelism, the data pipeline and the
//! report, each timed against what it is a part of.
use std::path::{Path, PathBuf};
use std::time::Instant;
use switch_runner::sweep::{self, SweepOptions};

/// A copy of `grid` with fewer steps, evaluation only at the end, and the first `points` points.
fn short_plan(grid: &Path, steps: u64, points: usize) -> anyhow::Result<switch_runner::Plan> {
    let mut plan = switch_runner::plan(grid)?;
    plan.runs.truncate(points);
    for r in &mut plan.runs {
        let t = &mut r.config.train;
        (t.steps, t.eval_every, t.log_every, t.checkpoint_every) = (steps, steps, steps, steps);
        r.config.data.eval_examples = r.config.data.eval_examples.min(64);
        r.run_id = switch_runner::grid::run_id(&r.config);
    }
    Ok(plan)
}

fn timed_sweep(plan: &switch_runner::Plan, jobs: usize, threads: usize) -> anyhow::Result<f64> {
    let dir = tempfile_dir()?;
    let opts = SweepOptions {
        results_root: dir.clone(),
        jobs: Some(jobs),
        threads_per_run: Some(threads),
        retry_failed: false,
        max_memory: None,
    };
    // Build the datasets first (cached) so only training is timed.
    sweep::datasets(&plan.runs.iter().map(|r| &r.config.data).collect::<Vec<_>>(), Path::new("results"))?;
    let cache = Path::new("results/.cache");
    if cache.exists() {
        std::fs::create_dir_all(&dir)?;
        let _ = std::os::unix::fs::symlink(std::fs::canonicalize(cache)?, dir.join(".cache"));
    }
    let t = Instant::now();
    let summary = sweep::sweep(plan, &opts)?;
    anyhow::ensure!(summary.ok(), "benchmark sweep failed: {}", summary.describe());
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(secs)
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    // process id + a per-process counter: unique within and across concurrent benchmarks
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("switch-bench-{}-{n}", std::process::id()));
    Ok(dir)
}

/// `switch-bench sweep`: aggregate tokens/s of `grid`'s first 4 points for each split of the cores
/// (runs × threads) ÷ one run alone, and model FLOPs/s ÷ the machine's f32 matmul FLOPs/s.
pub fn sweep(grid: &Path, steps: u64) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let plan = short_plan(grid, steps, 4)?;
    let tokens_per_run = |r: &switch_runner::grid::PlannedRun| {
        let (le, ld) = r.config.lengths();
        (r.config.train.batch_size * (le + ld)) as f64 * steps as f64
    };
    let total_tokens: f64 = plan.runs.iter().map(tokens_per_run).sum();
    let mut alone = plan.clone();
    alone.runs.truncate(1);
    let t_alone = timed_sweep(&alone, 1, cores)?;
    let single = tokens_per_run(&alone.runs[0]) / t_alone;
    println!("{} runs × {steps} steps of {}; {cores} cores", plan.runs.len(), grid.display());
    println!("one run alone, {cores} thread(s): {single:.0} tokens/s");
    let mut best = (0.0, 0, 0);
    let mut jobs = 1;
    while jobs <= cores {
        let threads = (cores / jobs).max(1);
        let secs = timed_sweep(&plan, jobs, threads)?;
        let agg = total_tokens / secs;
        println!(
            "{jobs} run(s) at once × {threads} thread(s): {agg:.0} tokens/s aggregate = {:.2} × one run alone",
            agg / single
        );
        if agg > best.0 {
            best = (agg, jobs, threads);
        }
        jobs *= 2;
    }
    println!(
        "best split: {} run(s) × {} thread(s) (the default on {cores} cores: {:?})",
        best.1,
        best.2,
        sweep::default_split(plan.runs.len())
    );
    let flops_per_step =
        |r: &switch_runner::grid::PlannedRun| 3.0 * r.accounting.flops_per_token * tokens_per_run(r) / steps as f64;
    let model_flops = plan.runs.iter().map(|r| flops_per_step(r) * steps as f64).sum::<f64>() / (total_tokens / best.0);
    let (dfdx, engine) = crate::engine::matmul_flops_per_s(cores);
    let machine = dfdx.max(engine);
    println!("model FLOPs/s (forward+backward ≈ 3 × forward) ÷ machine f32 matmul FLOPs/s ({:.1} GFLOP/s, 1024³, {cores} threads): {:.3}", machine / 1e9, model_flops / machine);
    Ok(())
}

/// `switch-bench data`: batch-production time ÷ training-step time for `grid`'s first point.
pub fn data(grid: &Path) -> anyhow::Result<()> {
    let plan = short_plan(grid, 4, 1)?;
    let cfg = &plan.runs[0].config;
    let data = sweep::datasets(&[&cfg.data], Path::new("results"))?;
    let ds = data.values().next().expect("dataset");
    let t = Instant::now();
    let reps = 50;
    for s in 0..reps {
        std::hint::black_box(ds.train_batch(0, s, cfg.train.batch_size));
    }
    let batch_s = t.elapsed().as_secs_f64() / reps as f64;
    let secs = timed_sweep(&plan, 1, std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))?;
    let step_s = secs / 4.0;
    println!(
        "batch production {:.3} ms, training step {:.1} ms (incl. one evaluation): data ÷ step = {:.4} ({:.2}%)",
        batch_s * 1e3,
        step_s * 1e3,
        batch_s / step_s,
        100.0 * batch_s / step_s
    );
    Ok(())
}

/// `switch-bench report`: the time of `switchlab report` on a synthetic sweep of 6 runs × 2,000
/// logged steps.
pub fn report() -> anyhow::Result<()> {
    let dir = tempfile_dir()?.join("synthetic");
    for i in 0..6u64 {
        let id = format!("run{i}");
        let run = switch_analysis::synthetic::SyntheticRun {
            eval_every: 50,
            log_every: 1,
            batch_size: 32,
            ..switch_analysis::synthetic::SyntheticRun::new(&id, 1 << i, 0, 2000)
        };
        run.write(&dir, |s| -3.0 + s.ln() * 0.1 * (1.0 + i as f64 * 0.05))?;
    }
    let t = Instant::now();
    switch_analysis::report(&dir, &switch_analysis::ReportOptions { threshold: None, at_step: None })?;
    println!("report on 6 runs × 2,000 logged steps: {:.3} s", t.elapsed().as_secs_f64());
    let _ = std::fs::remove_dir_all(dir.parent().unwrap_or(&dir));
    Ok(())
}
