//! Forward + backward time of one Switch layer ÷ the dense feed-forward layer of equal FLOPs
//! per token, measured side by side (interleaved, median of repeats) in one process.
//!
//! `cargo bench -p switch-model --bench switch_layer` (add `-- --quick` for fewer repeats).
use dfdx::prelude::*;
use rand::{rngs::StdRng, SeedableRng};
use std::time::Instant;
use switch_model::moe::MoeLayer;
use switch_model::nn::{Ctx, ExpertFfn};
use switch_model::ModelConfig;

type Dev = Cpu;

fn time(f: &mut dyn FnMut()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let reps = if quick { 3 } else { 9 };
    let (tokens, d_model, d_ff) = (4096, 256, 1024);
    let dev = Dev::default();
    let x: Tensor<(usize, usize), f32, Dev> = dev.sample_normal_like(&(tokens, d_model));
    println!("Switch layer ÷ dense layer, forward+backward, {tokens} tokens, d_model {d_model}, d_ff {d_ff} (median of {reps})");
    println!("{:>8} {:>10} {:>12} {:>12} {:>8}", "experts", "capacity", "dense ms", "switch ms", "ratio");
    for cf in [1.0, 1.25] {
        for experts in [1, 2, 4, 8, 16, 32, 64] {
            let cfg = ModelConfig {
                d_model,
                d_ff,
                num_experts: experts,
                capacity_factor: cf,
                min_expert_capacity: 1,
                ..Default::default()
            };
            let mut rng = StdRng::seed_from_u64(0);
            let dense = ExpertFfn::new(&dev, &mut rng, &cfg, 1);
            let switch = MoeLayer::new(&dev, &mut rng, &cfg);
            let mut dense_step = || {
                let y = dense.forward(
                    x.clone().retaped::<OwnedTape<f32, Dev>>().reshape_like(&(1, tokens, d_model)),
                    None,
                    0.0,
                    &mut Ctx::train(0),
                );
                std::hint::black_box(y.sum().backward());
            };
            let mut switch_step = || {
                let out = switch.forward(x.clone().retaped::<OwnedTape<f32, Dev>>(), &[], tokens, &mut Ctx::train(0));
                std::hint::black_box((out.output.sum() + out.balance_loss + out.z_loss).backward());
            };
            dense_step();
            switch_step();
            let (mut td, mut ts) = (Vec::new(), Vec::new());
            for _ in 0..reps {
                td.push(time(&mut dense_step));
                ts.push(time(&mut switch_step));
            }
            let (d, s) = (median(td), median(ts));
            println!("{experts:>8} {cf:>10} {:>12.2} {:>12.2} {:>8.3}", d * 1e3, s * 1e3, s / d);
        }
    }
}
