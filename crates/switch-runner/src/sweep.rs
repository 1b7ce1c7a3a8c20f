//! Running a planned sweep on this machine: skip finished runs, resume interrupted ones, run
//! the rest concurrently (one rayon pool per run), isolate failures, show progress.
use crate::error::{Error, Result};
use crate::grid::{label, Plan, PlannedRun, RunFile};
use crate::rundir::{self, RunDir, State};
use crate::train::{self, Outcome};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use switch_data::{DataConfig, Dataset};

static STOP: AtomicBool = AtomicBool::new(false);

/// Set by Ctrl-C: active runs checkpoint and stop; the sweep can be resumed by running it again.
pub fn stop_flag() -> &'static AtomicBool {
    &STOP
}

pub struct SweepOptions {
    /// Folder holding one sub-folder per sweep (`results/`).
    pub results_root: PathBuf,
    pub jobs: Option<usize>,
    pub threads_per_run: Option<usize>,
    pub retry_failed: bool,
    /// Memory budget (`--max-memory`); `None`: MemAvailable, or no limit where it cannot be read.
    pub max_memory: Option<crate::grid::MemoryLimit>,
}

#[derive(Debug, Default)]
pub struct SweepSummary {
    pub done: Vec<String>,
    pub skipped_done: Vec<String>,
    pub skipped_failed: Vec<String>,
    pub failed: Vec<(String, String)>,
    pub interrupted: Vec<String>,
}

impl SweepSummary {
    pub fn ok(&self) -> bool {
        self.failed.is_empty() && self.interrupted.is_empty() && self.skipped_failed.is_empty()
    }
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} trained, {} already done, {} failed, {} interrupted",
            self.done.len(),
            self.skipped_done.len(),
            self.failed.len() + self.skipped_failed.len(),
            self.interrupted.len()
        );
        for (id, e) in &self.failed {
            s.push_str(&format!("\n  failed {id}: {e}"));
        }
        for id in &self.skipped_failed {
            s.push_str(&format!("\n  failed earlier {id} (rerun with --retry-failed)"));
        }
        if !self.interrupted.is_empty() {
            s.push_str("\n  interrupted runs keep their checkpoints: run the same command again to resume");
        }
        s
    }
}

/// A lock file that refuses a second sweep on the same folder; removed on drop.
pub struct SweepLock(PathBuf);

impl SweepLock {
    pub fn acquire(sweep_dir: &Path) -> Result<Self> {
        let path = sweep_dir.join(".lock");
        for _ in 0..2 {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    use std::io::Write;
                    write!(f, "{}", std::process::id())?;
                    return Ok(Self(path));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let pid = std::fs::read_to_string(&path).unwrap_or_default();
                    let alive = pid.trim().parse::<u32>().is_ok_and(|p| Path::new(&format!("/proc/{p}")).exists());
                    if alive || !Path::new("/proc/self").exists() {
                        return Err(Error::Folder(format!("{} is locked by another sweep (pid {}); wait for it, or delete the lock file if no sweep is running", path.display(), pid.trim())));
                    }
                    std::fs::remove_file(&path)?; // stale: its process is gone
                }
                Err(e) => {
                    return Err(Error::Folder(format!(
                        "cannot create {} ({e}): is the results folder writable?",
                        path.display()
                    )))
                }
            }
        }
        Err(Error::Folder(format!("cannot take the lock {}", path.display())))
    }
}

impl Drop for SweepLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Builds each distinct dataset once (tokenizer trained or loaded from `<results>/.cache`).
pub fn datasets(configs: &[&DataConfig], results_root: &Path) -> Result<HashMap<String, Arc<Dataset>>> {
    let mut out = HashMap::new();
    for c in configs {
        let key = serde_json::to_string(c).expect("serializable");
        if let std::collections::hash_map::Entry::Vacant(e) = out.entry(key) {
            e.insert(Arc::new(Dataset::build(c, &results_root.join(".cache"))?));
        }
    }
    Ok(out)
}

/// On 2 cores, two runs with one thread each beat one run with two threads (only dfdx's matmul
/// is multi-threaded); `switch-bench sweep` measures it.
pub fn default_split(pending: usize) -> (usize, usize) {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let jobs = pending.clamp(1, cores);
    (jobs, (cores / jobs).max(1))
}

/// Refuses more threads in all than [`MAX_THREADS_PER_CORE`] per core: beyond that they only
/// spin against each other, and thousands never let training start.
fn check_threads(plan: &Plan, jobs: usize, threads: usize) -> Result<()> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let limit = cores * MAX_THREADS_PER_CORE;
    if jobs.saturating_mul(threads) > limit {
        return Err(Error::input(
            &plan.path,
            format!("--jobs {jobs} × --threads {threads} = {} threads, more than {limit} ({MAX_THREADS_PER_CORE} per core on this machine's {cores}): lower --jobs or --threads", jobs.saturating_mul(threads)),
        ));
    }
    Ok(())
}

/// The most threads a sweep may start per core.
pub const MAX_THREADS_PER_CORE: usize = 4;

/// Trains one run in its folder (created here), recording failure in `status.json`.
pub fn run_one(run: &RunFile, ds: &Dataset, dir: &RunDir, progress: train::Progress) -> Result<Outcome> {
    dir.create(&run.yaml())?;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        train::train(&run.config, ds, dir, stop_flag(), progress)
    }));
    let err = match result {
        Ok(Ok(o)) => return Ok(o),
        Ok(Err(e)) => e,
        Err(p) => Error::Training(format!(
            "panic: {}",
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        )),
    };
    let mut status = dir.read_status().unwrap_or_else(|| run.config.new_status());
    status.state = State::Failed;
    status.error = Some(err.to_string());
    status.finished_at = Some(rundir::now());
    dir.write_status(&status)?;
    Err(err)
}

/// Run folders: `runs/`, the lock (held while the sweep trains), the grid and plan as run.
fn prepare_folder(plan: &Plan, sweep_dir: &Path) -> Result<SweepLock> {
    std::fs::create_dir_all(sweep_dir.join("runs")).map_err(|e| {
        Error::Folder(format!(
            "cannot create the results folder {} ({e}): choose a writable --results folder",
            sweep_dir.display()
        ))
    })?;
    let lock = SweepLock::acquire(sweep_dir)?;
    if let Ok(grid) = std::fs::read(&plan.path) {
        rundir::write_atomic(&sweep_dir.join("grid.yaml"), &grid)?;
    }
    rundir::write_atomic(&sweep_dir.join("plan.csv"), plan.table(true).as_bytes())?;
    Ok(lock)
}

/// The sweep's progress: one bar for all steps (drawn only on a terminal).
fn overall_bar(plan: &Plan, pending: &[&PlannedRun]) -> (MultiProgress, ProgressBar) {
    let bars = MultiProgress::with_draw_target(if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let total_steps: u64 = pending.iter().map(|r| r.config.train.steps).sum();
    let overall = bars.add(ProgressBar::new(total_steps));
    overall.set_style(
        ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} steps, ETA {eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    overall.set_prefix(plan.name.clone());
    (bars, overall)
}

/// Trains one pending run in its folder, with its own progress bar (or log lines when stderr
/// is not a terminal).
fn train_pending(
    plan: &Plan,
    run: &PlannedRun,
    data: &HashMap<String, Arc<Dataset>>,
    sweep_dir: &Path,
    (bars, overall): (&MultiProgress, &ProgressBar),
    pool: &rayon::ThreadPool,
) -> Result<Outcome> {
    let plain = !std::io::stderr().is_terminal();
    let file = plan.run_file(run);
    let ds = &data[&serde_json::to_string(&run.config.data).expect("serializable")];
    let dir = RunDir::new(sweep_dir.join("runs").join(&run.run_id));
    let bar = bars.insert_before(overall, ProgressBar::new(run.config.train.steps));
    bar.set_style(
        ProgressStyle::with_template("{prefix:>14} [{bar:20}] {pos}/{len} {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    bar.set_prefix(run.run_id.clone());
    let steps_before = dir.read_status().map(|s| s.steps_done).unwrap_or(0);
    bar.set_position(steps_before);
    overall.inc(steps_before);
    let last = AtomicUsize::new(steps_before as usize);
    let eval_every = run.config.train.eval_every;
    let label = label(&run.point);
    let progress = |step: u64, loss: f32, tps: f64| {
        bar.set_position(step);
        bar.set_message(format!("loss {loss:.3}, {tps:.0} tok/s"));
        let prev = last.swap(step as usize, Ordering::SeqCst) as u64;
        overall.inc(step.saturating_sub(prev));
        if plain && (step.is_multiple_of(eval_every) || step == run.config.train.steps) {
            tracing::info!(
                "{} {label}: step {step}/{}, train loss {loss:.3}, {tps:.0} tokens/s",
                run.run_id,
                run.config.train.steps
            );
        }
    };
    let outcome = pool.install(|| run_one(&file, ds, &dir, &progress));
    bar.finish_and_clear();
    if let Err(e) = &outcome {
        tracing::warn!("{} {label} failed: {e:#}", run.run_id);
    }
    outcome
}

/// `runs` (point by point, each point's seeds in the grid's order) reordered seed by seed: every
/// point's run of the first seed, then of the next. The arms of a paired comparison then train
/// close together in time, so their CPU seconds see the same state of a shared machine, and a
/// sweep stopped halfway holds whole seeds.
pub fn seed_major(runs: Vec<&PlannedRun>) -> Vec<&PlannedRun> {
    let mut seeds: Vec<u64> = Vec::new();
    for r in &runs {
        if !seeds.contains(&r.config.train.seed) {
            seeds.push(r.config.train.seed);
        }
    }
    let mut runs = runs;
    runs.sort_by_key(|r| seeds.iter().position(|&s| s == r.config.train.seed));
    runs
}

/// Runs every pending point of `plan` under `opts.results_root/<plan.name>/`, seed by seed
/// ([`seed_major`]).
pub fn sweep(plan: &Plan, opts: &SweepOptions) -> Result<SweepSummary> {
    let sweep_dir = opts.results_root.join(&plan.name);
    // Corpus and tokenizer problems surface here, before the sweep folder is written to.
    let (pending, triage) = plan.pending(&sweep_dir, opts.retry_failed);
    let pending = seed_major(pending);
    let mut summary = SweepSummary { skipped_done: triage.done, skipped_failed: triage.failed, ..Default::default() };
    let (jobs, threads) = default_split(pending.len());
    let (jobs, threads) = (opts.jobs.unwrap_or(jobs).max(1), opts.threads_per_run.unwrap_or(threads).max(1));
    check_threads(plan, jobs, threads)?;
    // The `jobs` largest pending runs at once must fit, before anything is written.
    let limit = opts.max_memory.clone().or_else(crate::grid::MemoryLimit::available);
    plan.check_memory(&pending, jobs, limit.as_ref())?;
    let data = datasets(&pending.iter().map(|r| &r.config.data).collect::<Vec<_>>(), &opts.results_root)?;
    let _lock = prepare_folder(plan, &sweep_dir)?;

    if pending.is_empty() {
        return Ok(summary);
    }
    tracing::info!(
        "sweep {}: {} runs to train ({} done), {jobs} at a time with {threads} thread(s) each",
        plan.name,
        pending.len(),
        summary.skipped_done.len()
    );

    let (bars, overall) = overall_bar(plan, &pending);
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(pending.len()) {
            scope.spawn(|| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
                while !stop_flag().load(Ordering::SeqCst) {
                    let Some(run) = pending.get(next.fetch_add(1, Ordering::SeqCst)) else { break };
                    let outcome = train_pending(plan, run, &data, &sweep_dir, (&bars, &overall), &pool);
                    results
                        .lock()
                        .expect("no poisoning")
                        .push((run.run_id.clone(), outcome.map_err(|e| format!("{e:#}"))));
                }
            });
        }
    });
    overall.finish_and_clear();
    for (id, r) in results.into_inner().expect("no poisoning") {
        match r {
            Ok(Outcome::Done) => summary.done.push(id),
            Ok(Outcome::Interrupted) => summary.interrupted.push(id),
            Err(e) => summary.failed.push((id, e)),
        }
    }
    // Runs never started because of Ctrl-C count as interrupted.
    let started: Vec<String> =
        summary.done.iter().chain(&summary.interrupted).chain(summary.failed.iter().map(|(i, _)| i)).cloned().collect();
    for r in pending {
        if !started.contains(&r.run_id) {
            summary.interrupted.push(r.run_id.clone());
        }
    }
    Ok(summary)
}
