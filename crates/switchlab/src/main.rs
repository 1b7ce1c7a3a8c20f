//! `switchlab`: plan, run and report Switch Transformer sweeps.
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use switch_runner::grid::RunFile;
use switch_runner::grid::{human_bytes, MemoryLimit};
use switch_runner::rundir::{self, RunDir, State};
use switch_runner::slurm;
use switch_runner::sweep::{self, SweepOptions};

#[derive(Parser)]
#[command(name = "switchlab", version, about = "Reproduce Switch Transformers scaling results on a CPU")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Csv,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Backend {
    Local,
    Slurm,
}

#[derive(Subcommand)]
enum Command {
    /// Expand a grid and print every run with its parameters and FLOPs per token; trains nothing.
    Plan {
        /// A grid file, or the name of one in experiments/ (e.g. `experts`).
        grid: PathBuf,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Runs trained at once, for the memory check (default: as `sweep`, one per core).
        #[arg(long)]
        jobs: Option<usize>,
        /// Memory budget, e.g. `8G` (default: MemAvailable from /proc/meminfo).
        #[arg(long)]
        max_memory: Option<String>,
    },
    /// Train every point of a grid that is not done yet (resuming interrupted runs).
    Sweep(SweepArgs),
    /// Show each run's state in a sweep folder, joined with Slurm's view of its jobs.
    Status { sweep_dir: PathBuf },
    /// Train one run folder from its config.yaml (what each Slurm task runs).
    Train { config: PathBuf },
    /// Write tables and figures for a sweep folder (results/SWEEP) into its report/ folder.
    Report {
        /// A sweep folder (results/SWEEP), or a sweep name.
        sweep_dir: PathBuf,
        /// Quality threshold for "time to threshold" (default: the dense baseline's final quality).
        #[arg(long, allow_hyphen_values = true)]
        threshold: Option<f64>,
        /// Step of "quality @ N steps" (default: the baseline's last step). A negative value is
        /// let through to `ReportOptions::validate`, whose error says what the flag accepts.
        #[arg(long, allow_hyphen_values = true)]
        at_step: Option<f64>,
    },
    /// For each finished Switch run of a sweep: the norm of each router's gradient from the
    /// cross-entropy alone and from the balance loss alone, at its last checkpoint.
    Probe {
        /// A sweep folder (results/SWEEP), or a sweep name.
        sweep_dir: PathBuf,
        /// Training batches to average over (the run's last ones).
        #[arg(long, default_value_t = 4)]
        batches: u64,
    },
}

/// `switchlab sweep`'s flags.
#[derive(Args)]
struct SweepArgs {
    /// A grid file, or the name of one in experiments/ (e.g. `experts`).
    grid: PathBuf,
    /// Folder that holds one sub-folder per sweep.
    #[arg(long, default_value = "results")]
    results: PathBuf,
    /// Runs trained at once (default: one per core).
    #[arg(long)]
    jobs: Option<usize>,
    /// Matmul threads per run (default: cores ÷ jobs).
    #[arg(long)]
    threads: Option<usize>,
    /// Train runs that failed before again.
    #[arg(long)]
    retry_failed: bool,
    /// Replace the grid's seeds, e.g. `--seeds 0,1,2`.
    #[arg(long, value_delimiter = ',')]
    seeds: Option<Vec<u64>>,
    #[arg(long, value_enum, default_value = "local")]
    backend: Backend,
    /// Write the report (results/SWEEP/report) when the sweep ends.
    #[arg(long)]
    report: bool,
    /// Slurm: block until the array job ends, then write the report.
    #[arg(long)]
    wait: bool,
    /// Slurm: write the sbatch script and print the command without submitting.
    #[arg(long)]
    dry_run: bool,
    /// Memory budget, e.g. `8G`: refuse runs estimated above it (default: MemAvailable from
    /// /proc/meminfo; with --backend slurm, the grid's slurm.mem per task).
    #[arg(long)]
    max_memory: Option<String>,
}

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    if let Err(e) = run(Cli::parse()) {
        let _ = std::io::Write::flush(&mut std::io::stdout()); // a plan's table before its refusal
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn install_ctrl_c() {
    let _ = ctrlc::set_handler(|| {
        if sweep::stop_flag().swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping: active runs write a checkpoint and stop (Ctrl-C again to quit at once)");
    });
}

/// `experts` → `experiments/experts.yaml` when no such file exists as given.
fn grid_path(arg: &Path) -> PathBuf {
    let named = Path::new("experiments").join(arg).with_extension("yaml");
    if !arg.exists() && arg.components().count() == 1 && arg.extension().is_none() && named.exists() {
        named
    } else {
        arg.to_path_buf()
    }
}

/// `switchlab probe`: router gradient norms by source, one line per router of each finished Switch run.
fn probe(sweep_dir: &Path, batches: u64) -> anyhow::Result<()> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(sweep_dir.join("runs"))
        .map_err(|e| anyhow::anyhow!("{}: no runs folder ({e})", sweep_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    dirs.sort();
    println!(
        "{:<14} {:<30} {:<22} {:>14} {:>14} {:>10}",
        "run", "point", "router", "‖g‖ from CE", "‖g‖ from α·bal", "CE ÷ bal"
    );
    let results_root = sweep_dir.parent().unwrap_or(Path::new("."));
    let mut not_probed = 0;
    for dir in dirs {
        let Ok(run) = RunFile::read(&dir.join("config.yaml")) else { continue };
        let dir = RunDir::new(dir);
        let done = dir.read_status().is_some_and(|s| s.state == State::Done);
        if run.config.model.num_experts < 2 || !done {
            continue;
        }
        let data = sweep::datasets(&[&run.config.data], results_root)?;
        let ds = data.values().next().expect("one dataset");
        // A run whose checkpoint cannot be read is named and skipped; the others are probed.
        let routers = match switch_runner::probe::probe_run(&dir, &run.config, ds, batches) {
            Ok(routers) => routers.unwrap_or_default(),
            Err(e) => {
                eprintln!("{}: not probed: {e}", run.run_id);
                not_probed += 1;
                continue;
            }
        };
        for r in routers {
            println!(
                "{:<14} {:<30} {:<22} {:>14.3e} {:>14.3e} {:>10.3}",
                run.run_id,
                switch_runner::grid::label(&run.point),
                r.name,
                r.from_cross_entropy,
                r.from_balance,
                r.from_cross_entropy / r.from_balance.max(f64::MIN_POSITIVE)
            );
        }
    }
    anyhow::ensure!(not_probed == 0, "{not_probed} finished run(s) not probed (named above)");
    Ok(())
}

/// `experts` → `results/experts` when no such folder exists as given.
fn sweep_path(arg: PathBuf) -> PathBuf {
    let named = Path::new("results").join(&arg);
    if !arg.exists() && named.exists() {
        named
    } else {
        arg
    }
}

/// `--max-memory SIZE`, else MemAvailable (`None` when unreadable: no limit).
fn memory_limit(flag: Option<&str>) -> anyhow::Result<Option<MemoryLimit>> {
    Ok(match flag {
        Some(text) => Some(MemoryLimit::from_flag(text)?),
        None => MemoryLimit::available(),
    })
}

/// The grid's `slurm.mem` as a per-task budget (`0` is Slurm's "all of the node": no limit).
fn slurm_mem_limit(plan: &switch_runner::Plan) -> Option<MemoryLimit> {
    let cfg = plan.slurm.as_ref()?;
    let bytes = cfg.mem_bytes().filter(|b| *b > 0.0)?;
    Some(MemoryLimit { bytes, source: format!("of slurm.mem = {}", cfg.mem.as_deref().unwrap_or_default()) })
}

/// Refuses to start a run whose estimated memory exceeds MemAvailable, marking it `failed`
/// (never `running`) with the reason.
fn check_run_memory(config: &Path, run: &RunFile) -> anyhow::Result<()> {
    let need = switch_runner::grid::memory_bytes(&run.config);
    let Some(limit) = MemoryLimit::available().filter(|l| need > l.bytes) else { return Ok(()) };
    let msg = format!(
        "{}: run {} needs about {} of memory, more than the {} {}: train it on a larger machine, or shrink the model or train.batch_size",
        config.display(),
        run.run_id,
        human_bytes(need),
        human_bytes(limit.bytes),
        limit.source
    );
    let dir = RunDir::new(config.parent().unwrap_or(Path::new(".")));
    let mut status = dir.read_status().unwrap_or_else(|| run.config.new_status());
    (status.state, status.error, status.finished_at) = (State::Failed, Some(msg.clone()), Some(rundir::now()));
    dir.write_status(&status)?;
    anyhow::bail!(msg)
}

/// `sweep --backend slurm`: check, tokenize once, submit one array job, optionally wait and report.
fn slurm_sweep(
    plan: &switch_runner::Plan,
    results: &Path,
    retry_failed: bool,
    dry_run: bool,
    wait: bool,
    max_memory: Option<MemoryLimit>,
) -> anyhow::Result<()> {
    if let Some(cfg) = &plan.slurm {
        cfg.validate(&plan.path)?;
    }
    slurm::check_sbatch(dry_run)?;
    // Each task trains one run in its own allocation: check each run alone.
    let limit = max_memory.or_else(|| slurm_mem_limit(plan));
    plan.check_memory(&plan.runs.iter().collect::<Vec<_>>(), 1, limit.as_ref())?;
    // Tokenize once here, so array tasks find the cache instead of racing to build it.
    sweep::datasets(&plan.runs.iter().map(|r| &r.config.data).collect::<Vec<_>>(), results)?;
    let sub = slurm::submit(plan, results, retry_failed, dry_run)?;
    let sweep_dir = results.join(&plan.name);
    eprintln!("sweep {}: {} run(s) to submit, {} already done", plan.name, sub.tasks, sub.triage.done.len());
    match &sub.job_id {
        Some(id) => eprintln!("submitted array job {id} ({} tasks): {}", sub.tasks, sub.command),
        None if dry_run => println!("{}", sub.command),
        None => eprintln!("nothing to submit"),
    }
    if wait && sub.job_id.is_some() {
        slurm::wait(&sweep_dir, std::time::Duration::from_secs(2));
        eprint!("{}", slurm::status_table(&sweep_dir)?);
        let path =
            switch_analysis::report(&sweep_dir, &switch_analysis::ReportOptions { threshold: None, at_step: None })?;
        eprintln!("report: {}", path.display());
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Plan { grid, format, jobs, max_memory } => {
            let plan = switch_runner::plan(&grid_path(&grid))?;
            print!("{}", plan.table(matches!(format, Format::Csv)));
            let runs: Vec<_> = plan.runs.iter().collect();
            let jobs = jobs.unwrap_or_else(|| sweep::default_split(runs.len()).0);
            plan.check_memory(&runs, jobs, memory_limit(max_memory.as_deref())?.as_ref())?;
        }
        Command::Sweep(args) => sweep_grid(args)?,
        Command::Train { config } => train(&config)?,
        Command::Report { sweep_dir, threshold, at_step } => {
            let sweep_dir = sweep_path(sweep_dir);
            let path = switch_analysis::report(&sweep_dir, &switch_analysis::ReportOptions { threshold, at_step })?;
            println!("{}", path.display());
        }
        Command::Status { sweep_dir } => {
            let sweep_dir = sweep_path(sweep_dir);
            print!("{}", slurm::status_table(&sweep_dir)?);
        }
        Command::Probe { sweep_dir, batches } => probe(&sweep_path(sweep_dir), batches)?,
    }
    Ok(())
}

/// `switchlab sweep`: train the grid's runs that are not done, here or as a Slurm array job; exits
/// with status 2 when a run failed.
fn sweep_grid(args: SweepArgs) -> anyhow::Result<()> {
    let SweepArgs { grid, results, jobs, threads, retry_failed, seeds, backend, report, wait, dry_run, max_memory } =
        args;
    let plan = switch_runner::grid::plan_with_seeds(&grid_path(&grid), seeds.as_deref())?;
    let max_memory = max_memory.as_deref().map(MemoryLimit::from_flag).transpose()?;
    if backend == Backend::Slurm {
        return slurm_sweep(&plan, &results, retry_failed, dry_run, wait, max_memory);
    }
    install_ctrl_c();
    let summary = switch_runner::sweep(
        &plan,
        &SweepOptions { results_root: results.clone(), jobs, threads_per_run: threads, retry_failed, max_memory },
    )?;
    eprintln!("sweep {}: {}", plan.name, summary.describe());
    eprintln!("results in {}", results.join(&plan.name).display());
    if report {
        let path = switch_analysis::report(
            &results.join(&plan.name),
            &switch_analysis::ReportOptions { threshold: None, at_step: None },
        )?;
        eprintln!("report: {}", path.display());
    }
    if !summary.ok() {
        std::process::exit(2);
    }
    Ok(())
}

/// `switchlab train`: train one run folder from its config.yaml (what each Slurm task runs).
fn train(config: &Path) -> anyhow::Result<()> {
    let run = RunFile::read(config).map_err(switch_runner::Error::Folder)?;
    // A config edited by hand is checked as a grid's would be, before anything runs.
    run.config
        .validate()
        .map_err(|e| switch_runner::Error::input(config, format!("{e}: fix the value in this file")))?;
    check_run_memory(config, &run)?;
    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    let results_root = dir.ancestors().nth(3).map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let data = sweep::datasets(&[&run.config.data], &results_root)?;
    let ds = data.values().next().expect("one dataset");
    install_ctrl_c();
    let progress = |step: u64, loss: f32, tps: f64| {
        if step.is_multiple_of(run.config.train.eval_every) || step == run.config.train.steps {
            tracing::info!(
                "{}: step {step}/{}, train loss {loss:.3}, {tps:.0} tokens/s",
                run.run_id,
                run.config.train.steps
            );
        }
    };
    let outcome = sweep::run_one(&run, ds, &RunDir::new(dir), &progress)?;
    tracing::info!("{}: {:?}", run.run_id, outcome);
    Ok(())
}
