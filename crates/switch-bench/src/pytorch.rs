//! PyTorch beside switchlab's engine, in the same run: PyTorch's f32 matmul, and HF transformers'
//! T5 / Switch Transformer trained on the engine benchmark's comparison shape, each in a child
//! process running `bench/pytorch_engine.py` (which reports one line of JSON, read by `child`).
use crate::child::{self, Measured, PytorchMatmul, PytorchRun};
use crate::engine::{child as engine_child, quantile, shape, with_matmul_beside, Matmul, TRAINING};
use std::path::{Path, PathBuf};
use std::process::Command;

const SCRIPT: &str = "bench/pytorch_engine.py";

/// Where `just bench-pytorch` installs torch and transformers.
pub const VENV_PYTHON: &str = ".venv-torch/bin/python";

/// A Python that imports torch and transformers.
pub struct Torch {
    pub python: PathBuf,
    /// "torch-version transformers-version".
    pub versions: String,
}

impl Torch {
    /// `python`, if it imports torch and transformers (run from the repository root, where the
    /// script is); otherwise an error that says how to install them.
    pub fn at(python: &Path) -> anyhow::Result<Torch> {
        anyhow::ensure!(
            Path::new(SCRIPT).exists(),
            "{SCRIPT} not found: run switch-bench's PyTorch comparison from the repository root"
        );
        let out = Command::new(python)
            .args(["-c", "import torch, transformers; print(torch.__version__, transformers.__version__)"])
            .output();
        match out {
            Ok(out) if out.status.success() => Ok(Torch {
                python: python.to_path_buf(),
                versions: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            }),
            _ => anyhow::bail!(
                "`{}` cannot import torch and transformers; install them with `python3 -m venv .venv-torch && .venv-torch/bin/pip install torch transformers` (or `just bench-pytorch`) and pass `--python {VENV_PYTHON}`",
                python.display()
            ),
        }
    }

    /// PyTorch's f32 matmul FLOP/s at 1024³ on `threads` threads, timed as the engine
    /// benchmark times gemm's (a warm-up product, then five).
    pub fn matmul_flops_per_s(&self, threads: usize) -> anyhow::Result<f64> {
        let out = Command::new(&self.python)
            .args([SCRIPT, "--matmul", "--threads", &threads.to_string()])
            .env("OMP_NUM_THREADS", threads.to_string())
            .output()?;
        Ok(child::parse::<PytorchMatmul>("PyTorch matmul", &out)?.flops_per_s)
    }

    /// One PyTorch training run of the comparison shape with `experts` experts, 2 threads: its
    /// step seconds.
    fn step_s(&self, experts: usize, steps: u64) -> anyhow::Result<f64> {
        let c = shape(experts);
        let (le, ld) = c.lengths();
        let m = &c.model;
        let mut cmd = Command::new(&self.python);
        cmd.arg(SCRIPT).env("OMP_NUM_THREADS", "2");
        for (name, v) in [
            ("experts", experts),
            ("threads", 2),
            ("steps", steps as usize),
            ("vocab", m.vocab_size),
            ("encoder-len", le),
            ("decoder-len", ld),
            ("batch", c.train.batch_size),
            ("d-model", m.d_model),
            ("d-ff", m.d_ff),
            ("d-kv", m.d_kv),
            ("heads", m.num_heads),
            ("layers", m.num_encoder_layers),
        ] {
            cmd.args([format!("--{name}"), v.to_string()]);
        }
        let out = cmd.args(["--capacity-factor", &m.capacity_factor.to_string()]).output()?;
        Ok(child::parse::<PytorchRun>("PyTorch run", &out)?.step_s)
    }
}

/// `switch-bench pytorch`: PyTorch's matmul beside gemm's, then [`compare`].
pub fn run(steps: u64, rounds: usize, python: &Path) -> anyhow::Result<()> {
    let torch = Torch::at(python)?;
    println!("PyTorch and transformers {}", torch.versions);
    let matmul = crate::engine::best_matmul(2, Some(&torch))?;
    compare(&torch, steps, rounds, matmul)
}

/// One round's runs of one size: switchlab's, PyTorch's step time, and what "÷ matmul" divides
/// both by (the fastest opening matmul scaled by gemm 0.19 beside the pair, [`Matmul::beside`]).
struct Pair {
    ours: Measured,
    pytorch_step_s: f64,
    matmul: f64,
}

/// switchlab's engine as it trains and PyTorch on the comparison shape, 2 threads, dense,
/// Switch-8 and Switch-64, each run in its own process, the two alternating `rounds` times:
/// tokens/s, the speed ratio, and each side's model FLOPs/s ÷ the best f32 matmul measured on the
/// machine (`matmul`, scaled beside each pair).
pub fn compare(torch: &Torch, steps: u64, rounds: usize, matmul: Matmul) -> anyhow::Result<()> {
    println!("switchlab (as it trains) beside PyTorch + transformers on the comparison shape: {steps} steps after a warm-up step, 2 threads; each ratio is the median over {rounds} rounds of ratios within a round");
    // Per size, per round: every run of a round before the next round, so that a ratio compares
    // runs minutes apart at most.
    let sizes = [1, 8, 64];
    let mut runs: Vec<Vec<Pair>> = (0..sizes.len()).map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (runs, &e) in runs.iter_mut().zip(&sizes) {
            let pair = || Ok((engine_child(false, e, 2, steps, TRAINING)?, torch.step_s(e, steps)?));
            let ((ours, pytorch_step_s), beside) = with_matmul_beside(2, pair)?;
            runs.push(Pair { ours, pytorch_step_s, matmul: matmul.beside(beside) });
        }
    }
    let median = |x: Vec<f64>| quantile(&x, 0.5);
    for (runs, &e) in runs.iter().zip(&sizes) {
        let name = if e == 1 { "dense".to_string() } else { format!("Switch-{e}") };
        let first = &runs[0].ours;
        let pytorch_tokens = |r: &Pair| first.tokens_per_s * first.step_s / r.pytorch_step_s;
        let flops_ratio = |tokens_per_s: f64, r: &Pair| 3.0 * first.flops_per_token * tokens_per_s / r.matmul;
        println!(
            "{name:<10} tokens/s switchlab {:?}, PyTorch {:?}: switchlab ÷ PyTorch speed {:.2}; model FLOPs/s ÷ best matmul (of {:?} GFLOP/s): switchlab {:.2}, PyTorch {:.2}",
            runs.iter().map(|r| r.ours.tokens_per_s.round()).collect::<Vec<_>>(),
            runs.iter().map(|r| pytorch_tokens(r).round()).collect::<Vec<_>>(),
            median(runs.iter().map(|r| r.pytorch_step_s / r.ours.step_s).collect()),
            runs.iter().map(|r| (r.matmul / 1e9).round()).collect::<Vec<_>>(),
            median(runs.iter().map(|r| flops_ratio(r.ours.tokens_per_s, r)).collect()),
            median(runs.iter().map(|r| flops_ratio(pytorch_tokens(r), r)).collect()),
        );
    }
    for (switch, &e) in runs.iter().zip(&sizes).skip(1) {
        let ratio =
            |side: fn(&Pair) -> f64| median(switch.iter().zip(&runs[0]).map(|(s, d)| side(s) / side(d)).collect());
        let (ours, pytorch) = (ratio(|r| r.ours.step_s), ratio(|r| r.pytorch_step_s));
        println!("Switch-{e} ÷ dense step time: switchlab {ours:.2}, PyTorch {pytorch:.2}");
    }
    Ok(())
}
