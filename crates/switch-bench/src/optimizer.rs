//! `switch-bench optimizer`: the per-step passes over every parameter that are not products — the
//! gradient norm and the optimizer update (AdamW with f32 or bf16 moments, Adafactor) — on one
//! thread, over a flat parameter too large for the caches, each timed in rounds that alternate, as
//! GB/s of the bytes each pass must move.
use std::time::Instant;
use switch_runner::config::{MomentPrecision, OptimizerKind, TrainConfig};
use switch_runner::optim::{sum_of_squares, OptimizerState};

use crate::engine::optimizer_bytes_per_param as bytes;

/// One pass: its name, the bytes per parameter it must move, and what it runs.
struct Pass {
    name: &'static str,
    bytes: f64,
    state: Option<OptimizerState>,
}

pub fn run(params: usize, rounds: usize) -> anyhow::Result<()> {
    anyhow::ensure!(params >= 1 << 16 && rounds >= 1, "--params ≥ 65536 and --rounds ≥ 1");
    let cfg = TrainConfig::default();
    let adafactor_cfg = TrainConfig { optimizer: OptimizerKind::Adafactor, ..cfg.clone() };
    // As an expert's [E, d, f] stack of the tiny preset: 64 × 256 matrices.
    let shape = [params / (64 * 256), 64, 256];
    let n = shape.iter().product();
    let grads = vec![(0..n).map(|i| ((i % 977) as f32 - 488.0) * 1e-5).collect::<Vec<f32>>()];
    let mut weights = vec![vec![0.01f32; n]];
    let mut passes = [
        Pass { name: "gradient norm (Σg² in f64)", bytes: 4.0, state: None },
        Pass {
            name: "AdamW, f32 moments (the default)",
            bytes: bytes(OptimizerKind::Adamw, MomentPrecision::F32),
            state: Some(OptimizerState::adamw(&[n])),
        },
        Pass {
            name: "AdamW, bf16 moments (train.optimizer_moments: bf16)",
            bytes: bytes(OptimizerKind::Adamw, MomentPrecision::Bf16),
            state: Some(OptimizerState::adamw(&[n]).with_moments(MomentPrecision::Bf16)),
        },
        Pass {
            name: "Adafactor (factored: 64 × 256 matrices)",
            bytes: bytes(OptimizerKind::Adafactor, MomentPrecision::F32),
            state: Some(OptimizerState::new(OptimizerKind::Adafactor, &[shape])),
        },
    ];
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let mut secs = vec![Vec::new(); passes.len()];
    pool.install(|| {
        for round in 0..=rounds {
            for (pass, secs) in passes.iter_mut().zip(secs.iter_mut()) {
                let start = Instant::now();
                match &mut pass.state {
                    None => {
                        std::hint::black_box(sum_of_squares(&grads[0]));
                    }
                    Some(opt) => {
                        let c = if opt.kind == OptimizerKind::Adafactor { &adafactor_cfg } else { &cfg };
                        opt.step(&mut weights, &grads, round as u64 + 1, 1e-3, c);
                    }
                }
                if round > 0 {
                    secs.push(start.elapsed().as_secs_f64()); // round 0 touches the pages
                }
            }
        }
    });
    println!("{n} parameters (a tiny-preset Switch-{} layer pair's experts), 1 thread, {rounds} rounds alternating the passes; median time:", n / (64 * 256 * 2 * 2));
    for (pass, secs) in passes.iter().zip(&mut secs) {
        secs.sort_by(f64::total_cmp);
        let s = secs[secs.len() / 2];
        println!(
            "{:<55} {:>7.1} ms  {:>5.1} GB/s of the {} bytes per parameter it must move",
            pass.name,
            s * 1e3,
            pass.bytes * n as f64 / s / 1e9,
            pass.bytes
        );
    }
    Ok(())
}
