//! `switch-bench`: speed figures measured side by side in one process, printed as ratios. The
//! benchmark harness of switchlab, apart from the `switchlab` binary; hidden subcommands are the
//! children it re-runs itself as, which report to it in JSON (`child`).
use clap::{Parser, Subcommand};
use std::path::PathBuf;

mod child;
mod engine;
mod harness;
mod optimizer;
mod products;
mod pytorch;
mod slots;

#[derive(Parser)]
#[command(name = "switch-bench", version, about = "Measure switchlab's speed figures on this machine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Aggregate training tokens/s of a 4-point sweep for each split of cores (runs × threads),
    /// ÷ one run alone; and model FLOPs/s ÷ the machine's f32 matmul FLOPs/s.
    Sweep {
        #[arg(long, default_value = "experiments/experts.yaml")]
        grid: PathBuf,
        #[arg(long, default_value_t = 12)]
        steps: u64,
    },
    /// Batch-production time ÷ training-step time for a grid's first point.
    Data {
        #[arg(long, default_value = "experiments/experts.yaml")]
        grid: PathBuf,
    },
    /// Time of `switchlab report` on a synthetic sweep of 6 runs × 2,000 logged steps.
    Report,
    /// The training engine: tokens/s, model FLOPs/s ÷ matmul FLOPs/s, Switch ÷ dense step time,
    /// kernel ÷ user CPU time and peak memory, on the comparison shape and the tiny preset.
    Engine {
        #[arg(long, default_value_t = 8)]
        steps: u64,
        /// Switch ÷ dense: this many pairs of steps, dense and Switch alternating in one process.
        #[arg(long, default_value_t = 16)]
        pairs: u64,
        /// Only the engine as `switchlab sweep` trains (`fused_slots`, buffer cache, AdamW), the
        /// same with bf16 moments, with `fused` and with `fused_router`.
        #[arg(long)]
        only_training: bool,
        /// A Python with torch and transformers, for PyTorch's matmul and tokens/s beside
        /// switchlab's (default: .venv-torch/bin/python, where `just bench-pytorch` installs
        /// them, when it imports them; without one, PyTorch's figures are left out).
        #[arg(long)]
        python: Option<PathBuf>,
    },
    /// The passes over every parameter that are not products (gradient norm; AdamW with f32 or
    /// bf16 moments; Adafactor) on one thread, as GB/s of the bytes each must move.
    Optimizer {
        #[arg(long, default_value_t = 8_388_608)]
        params: usize,
        #[arg(long, default_value_t = 9)]
        rounds: usize,
    },
    /// The experts' products as `fused_router` runs them (gemm, every slot) against `fused_slots`
    /// (own loops, filled slots only), forward and backward, on the `tiny` preset's expert shapes.
    Slots {
        #[arg(long, default_value_t = 9)]
        rounds: usize,
        /// Fraction of each expert's slots in use (up to its last filled one) for fused_slots.
        #[arg(long, default_value_t = 1.0)]
        in_use: f64,
    },
    /// The dense model's parameter products by themselves (forward, ∂x, ∂W; the comparison
    /// shape on 2 threads, `tiny` on 1), with their operands in the caches and after evicting
    /// them, ÷ gemm 0.19's 1024³ matmul measured beside.
    Products {
        #[arg(long, default_value_t = 9)]
        rounds: usize,
        /// MiB read on every thread to evict the caches before each cold pass (more than the L2 and L3).
        #[arg(long, default_value_t = 256)]
        evict_mib: usize,
    },
    /// switchlab's engine against HF transformers' T5 and Switch Transformer in PyTorch on the
    /// engine benchmark's comparison shape, side by side (needs a Python with torch and
    /// transformers; see `bench/pytorch_engine.py`).
    Pytorch {
        #[arg(long, default_value_t = 8)]
        steps: u64,
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        #[arg(long, default_value = "python3")]
        python: PathBuf,
    },
    /// Switch ÷ dense ratios of `engine`, in their own process (used by `engine`; prints one line
    /// of JSON, `child::PairRatios`).
    #[command(hide = true)]
    EnginePairs {
        #[arg(long)]
        tiny: bool,
        #[arg(long)]
        experts: usize,
        #[arg(long)]
        threads: usize,
        #[arg(long)]
        pairs: u64,
        #[arg(long)]
        cache: String,
        #[arg(long, default_value = "adamw")]
        optimizer: String,
        #[arg(long, default_value = "f32")]
        moments: String,
        #[arg(long, default_value = "fused_slots")]
        kernels: String,
    },
    /// One run of `engine`, in its own process (used by `engine` and `pytorch`; prints one line of
    /// JSON, `child::Measured`).
    #[command(hide = true)]
    EngineRun {
        #[arg(long)]
        tiny: bool,
        #[arg(long)]
        experts: usize,
        #[arg(long)]
        threads: usize,
        #[arg(long)]
        steps: u64,
        #[arg(long)]
        cache: String,
        #[arg(long, default_value = "adamw")]
        optimizer: String,
        #[arg(long, default_value = "f32")]
        moments: String,
        #[arg(long, default_value = "fused_slots")]
        kernels: String,
    },
}

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    if let Err(e) = run(Cli::parse().command) {
        let _ = std::io::Write::flush(&mut std::io::stdout()); // the figures printed before the failure
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(what: Command) -> anyhow::Result<()> {
    match what {
        Command::Sweep { grid, steps } => harness::sweep(&grid, steps),
        Command::Data { grid } => harness::data(&grid),
        Command::Report => harness::report(),
        Command::Engine { steps, pairs, only_training, python } => {
            let torch = match python {
                Some(python) => Some(pytorch::Torch::at(&python)?),
                None => pytorch::Torch::at(std::path::Path::new(pytorch::VENV_PYTHON)).ok(),
            };
            engine::run(steps, pairs, only_training, torch.as_ref())
        }
        Command::Optimizer { params, rounds } => optimizer::run(params, rounds),
        Command::Slots { rounds, in_use } => slots::run(rounds, in_use),
        Command::Products { rounds, evict_mib } => products::run(rounds, evict_mib),
        Command::Pytorch { steps, rounds, python } => pytorch::run(steps, rounds, &python),
        Command::EnginePairs { tiny, experts, threads, pairs, cache, optimizer, moments, kernels } => {
            let recipe = engine::recipe_named(&optimizer, &moments, &kernels)?;
            engine::run_pairs(tiny, experts, threads, pairs, cache == "on", recipe)
        }
        Command::EngineRun { tiny, experts, threads, steps, cache, optimizer, moments, kernels } => {
            let recipe = engine::recipe_named(&optimizer, &moments, &kernels)?;
            engine::run_one(tiny, experts, threads, steps, cache == "on", recipe)
        }
    }
}
