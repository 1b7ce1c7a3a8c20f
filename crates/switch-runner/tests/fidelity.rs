//! Hand-computed checks of the training recipe: learning-rate schedules, AdamW and Adafactor steps, routing
//! groups resolved and honoured in evaluation, FLOPs solving in steps of 1.
use std::path::Path;
use switch_runner::config::{OptimizerKind, Schedule, TrainConfig};
use switch_runner::train::{evaluate, Dev, OptimizerState};
use switch_runner::RunConfig;

#[test]
fn t5_rsqrt_is_flat_during_warmup_and_linear_warmup_ramps() {
    let t5 = TrainConfig { learning_rate: 0.01, warmup_steps: 100, schedule: Schedule::Rsqrt, ..Default::default() };
    let ramp = TrainConfig { schedule: Schedule::LinearWarmupRsqrt, ..t5.clone() };
    // optimizer step s (1-based) = index + 1; T5: 0.01·√(100 / max(s, 100))
    let lr = |c: &TrainConfig, i: u64| c.learning_rate_at(i);
    for (i, rsqrt, linear) in [(0, 0.01, 0.0001), (49, 0.01, 0.005), (99, 0.01, 0.01), (399, 0.005, 0.005)] {
        assert!((lr(&t5, i) - rsqrt).abs() < 1e-12, "rsqrt at {i}: {}", lr(&t5, i));
        assert!((lr(&ramp, i) - linear).abs() < 1e-12, "linear warmup at {i}: {}", lr(&ramp, i));
    }
    // step 2500: √(100/2500) = 0.2
    assert!((lr(&t5, 2499) - 0.002).abs() < 1e-12);
}

#[test]
fn two_adamw_steps_by_hand() {
    let cfg = TrainConfig { beta1: 0.9, beta2: 0.99, weight_decay: 0.01, ..Default::default() };
    let mut params = vec![vec![1.0f32, -2.0]];
    let mut opt = OptimizerState::adamw(&[2]);
    // Step 1: bias-corrected m̂ = g, v̂ = g², so the update is lr·(sign(g) + wd·p).
    opt.step(&mut params, &[vec![0.5, -0.1]], 1, 0.1, &cfg);
    assert!((params[0][0] - 0.899).abs() < 1e-6 && (params[0][1] + 1.898).abs() < 1e-6, "{params:?}");
    assert!((opt.m[0][0] - 0.05).abs() < 1e-7 && (opt.v[0][0] - 0.0025).abs() < 1e-8);
    // Step 2, gradient reversed: m = 0.9·0.05 − 0.05 = −0.005, m̂ = −0.005/0.19; v = 0.004975, v̂ = 0.25.
    opt.step(&mut params, &[vec![-0.5, 0.1]], 2, 0.1, &cfg);
    assert!((params[0][0] - 0.903_364_2).abs() < 1e-6, "{params:?}");
    assert!((params[0][1] + 1.901_365_2).abs() < 1e-6, "{params:?}");
}

/// Mesh TF's Adafactor update of a `[batch, rows, cols]` variable (experts stacked) in f64, written
/// from its formulas: second moments factored per matrix (row means `[batch, rows]`, column means
/// `[batch, cols]`), the parameter scale and the update's RMS over the whole variable. Returns the
/// new weights and second moments.
fn adafactor_reference(
    p: &[f64],
    g: &[f64],
    (vr, vc): (&[f64], &[f64]),
    (batch, rows, cols): (usize, usize, usize),
    t: f64,
    lr: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let decay = 1.0 - t.powf(-0.8);
    let sq = |b: usize, r: usize, c: usize| g[(b * rows + r) * cols + c].powi(2) + 1e-30;
    let vr: Vec<f64> = (0..batch * rows)
        .map(|i| {
            let (b, r) = (i / rows, i % rows);
            decay * vr[i] + (1.0 - decay) * (0..cols).map(|c| sq(b, r, c)).sum::<f64>() / cols as f64
        })
        .collect();
    let vc: Vec<f64> = (0..batch * cols)
        .map(|i| {
            let (b, c) = (i / cols, i % cols);
            decay * vc[i] + (1.0 - decay) * (0..rows).map(|r| sq(b, r, c)).sum::<f64>() / rows as f64
        })
        .collect();
    let row_mean: Vec<f64> = vr.chunks(rows).map(|v| v.iter().sum::<f64>() / rows as f64).collect();
    let u: Vec<f64> = (0..p.len())
        .map(|i| {
            let (b, r, c) = (i / (rows * cols), i / cols % rows, i % cols);
            g[i] / (vr[b * rows + r] / row_mean[b] * vc[b * cols + c]).sqrt()
        })
        .collect();
    let rms = |x: &[f64]| (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64).sqrt();
    let step = lr * rms(p).max(1e-3) / (rms(&u) / 1.0).max(1.0);
    (p.iter().zip(&u).map(|(p, u)| p - step * u).collect(), vr, vc)
}

#[test]
fn adafactor_factors_large_matrices_as_mesh_tf_does() {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let cfg = TrainConfig { optimizer: OptimizerKind::Adafactor, ..Default::default() };
    // Two stacked experts of [128, 130] (factored: both sides ≥ 128) and a [4, 200] matrix (not).
    let (batch, rows, cols) = (2, 128, 130);
    let shapes = [[batch, rows, cols], [1, 4, 200]];
    let mut opt = OptimizerState::new(OptimizerKind::Adafactor, &shapes);
    let mut rng = StdRng::seed_from_u64(7);
    let mut p: Vec<f32> = (0..batch * rows * cols).map(|_| rng.gen_range(-0.1..0.1)).collect();
    let mut want: Vec<f64> = p.iter().map(|&x| x as f64).collect();
    let (mut vr, mut vc) = (vec![0.0; batch * rows], vec![0.0; batch * cols]);
    for t in 1..=3u64 {
        // Gradients with rows of very different scales, which the factored estimate must follow.
        let g: Vec<f32> =
            (0..p.len()).map(|i| rng.gen_range(-1.0..1.0) * (1 + i / cols % rows) as f32 * 0.01).collect();
        let lr = 0.01 / t as f64;
        opt.update(0, &mut p, &g, 1.0, t, lr, &cfg);
        let g64: Vec<f64> = g.iter().map(|&x| x as f64).collect();
        (want, vr, vc) = adafactor_reference(&want, &g64, (&vr, &vc), (batch, rows, cols), t as f64, lr);
        for (got, want) in p.iter().zip(&want) {
            assert!((*got as f64 - want).abs() < 1e-6 * (1.0 + want.abs()), "step {t}: {got} vs {want}");
        }
        // Only batch·(rows + cols) floats of state for the factored matrix.
        assert!(opt.v[0][batch * (rows + cols)..].iter().all(|&x| x == 0.0));
        assert!(opt.m[0].iter().all(|&x| x == 0.0), "no first moment");
    }
    // The small matrix keeps its whole second moment: after one step v = g² exactly (decay 0).
    let mut q = vec![0.5f32; 800];
    let g: Vec<f32> = (0..800).map(|i| (i as f32 - 400.0) * 1e-3).collect();
    opt.update(1, &mut q, &g, 1.0, 1, 0.01, &cfg);
    assert!(opt.v[1].iter().zip(&g).all(|(v, g)| (v - (g * g + 1e-30)).abs() <= 1e-12));
    // The update g/|g| = ±1 has RMS 1 (not clipped), times lr × RMS(p) = 0.005.
    assert!(q.iter().zip(&g).all(|(q, g)| g == &0.0 || (q - (0.5 - 0.005 * g.signum())).abs() < 1e-7));
}

/// bf16 rounds to nearest, ties to even, and holds bf16 values exactly.
#[test]
fn bf16_rounds_to_nearest_even() {
    use switch_runner::optim::{bf16_bits, from_bf16_bits};
    // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: to even (1); 1 + 3·2⁻⁸ is halfway up to 1 + 2⁻⁶.
    assert_eq!(from_bf16_bits(bf16_bits(1.0 + 1.0 / 256.0)), 1.0);
    assert_eq!(from_bf16_bits(bf16_bits(1.0 + 3.0 / 256.0)), 1.0 + 1.0 / 64.0);
    assert_eq!(from_bf16_bits(bf16_bits(1.0 + 1.5 / 256.0)), 1.0 + 1.0 / 128.0);
    let x = -3.0e-8f32; // within half a bf16 step (2⁻⁸ relative) of itself
    assert!((from_bf16_bits(bf16_bits(x)) - x).abs() <= x.abs() / 256.0);
    assert!(from_bf16_bits(bf16_bits(f32::NAN)).is_nan());
    assert_eq!(from_bf16_bits(bf16_bits(f32::INFINITY)), f32::INFINITY);
    for h in [0u16, 0x3f80, 0xc2f7, 0x0001, 0x7f7f] {
        assert_eq!(bf16_bits(from_bf16_bits(h)), h);
    }
}

/// AdamW with bf16 moments follows f32 AdamW to within the moments' 8 significant bits, and keeps
/// bf16 values only.
#[test]
fn adamw_with_bf16_moments_follows_f32_adamw() {
    use switch_runner::config::MomentPrecision;
    let cfg = TrainConfig::default();
    let n = 1000;
    let mut f32_opt = OptimizerState::adamw(&[n]);
    let mut bf16_opt = OptimizerState::adamw(&[n]).with_moments(MomentPrecision::Bf16);
    let (mut p, mut q) = (vec![vec![0.5f32; n]], vec![vec![0.5f32; n]]);
    for t in 1..=20u64 {
        let g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + t as f32 * 1.3).sin() * 0.1).collect();
        f32_opt.step(&mut p, std::slice::from_ref(&g), t, 1e-3, &cfg);
        bf16_opt.step(&mut q, &[g], t, 1e-3, &cfg);
    }
    let [m, v] = bf16_opt.moments(0);
    assert!(m.iter().chain(v.iter()).all(|x| x.to_bits() & 0xffff == 0), "bf16 values only");
    let m_scale = f32_opt.m[0].iter().fold(0f32, |a, x| a.max(x.abs()));
    for ((a, b), (m32, m16)) in p[0].iter().zip(&q[0]).zip(f32_opt.m[0].iter().zip(m.iter())) {
        assert!((a - b).abs() < 2e-4, "weights {a} vs {b}");
        assert!((m32 - m16).abs() <= 3e-2 * m_scale, "m {m32} vs {m16} (largest {m_scale})");
    }
    assert!(p[0] != q[0], "the rounding shows");
}

#[test]
fn bf16_moments_are_adamws_only() {
    use switch_runner::config::MomentPrecision;
    let cfg = TrainConfig {
        optimizer: OptimizerKind::Adafactor,
        optimizer_moments: MomentPrecision::Bf16,
        ..Default::default()
    };
    let e = cfg.validate().unwrap_err();
    assert!(e.contains("train.optimizer_moments = bf16") && e.contains("adamw"), "{e}");
}

#[test]
fn adafactor_refuses_weight_decay() {
    let cfg = TrainConfig { optimizer: OptimizerKind::Adafactor, weight_decay: 0.1, ..Default::default() };
    let e = cfg.validate().unwrap_err();
    assert!(e.contains("train.weight_decay = 0.1") && e.contains("adafactor"), "{e}");
}

fn write_grid(dir: &Path, body: &str) -> std::path::PathBuf {
    let corpus = switch_data::corpus::write_excerpt(&dir.join("corpus"), 200_000).unwrap();
    let path = dir.join("g.yaml");
    let settings = format!(
        "settings:\n  model: {{ d_model: 32, d_ff: 64, num_heads: 2, d_kv: 16, num_encoder_layers: 2, num_decoder_layers: 1, expert_every: 1, eval_capacity_factor: 0.5, min_expert_capacity: 1 }}\n  data: {{ corpus: {}, tokenizer: byte, encoder_len: 32, eval_examples: 16 }}\n  train: {{ steps: 4, batch_size: 4, eval_batch_size: 16 }}\n",
        corpus.display()
    );
    std::fs::write(&path, format!("name: g\n{settings}{body}")).unwrap();
    path
}

#[test]
fn routing_group_defaults_to_the_training_batch_and_evaluation_ignores_the_eval_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let plan = switch_runner::plan(&write_grid(tmp.path(), "points:\n  - { model.num_experts: 4 }\n")).unwrap();
    let cfg: RunConfig = plan.runs[0].config.clone();
    assert_eq!(cfg.model.group_size, Some(4), "resolved into the saved config");
    let ds = switch_data::Dataset::build(&cfg.data, &tmp.path().join("cache")).unwrap();
    let model = switch_model::SwitchTransformer::<Dev>::new(&Dev::default(), &cfg.model, 0).unwrap();
    let loss_at = |eval_batch_size: usize| {
        let c = RunConfig { train: TrainConfig { eval_batch_size, ..cfg.train.clone() }, ..cfg.clone() };
        evaluate(&model, &ds, &c, switch_data::Split::Validation).0
    };
    // eval batch 16 holds 4 groups; 4 and 8 hold 1 and 2; 6 rounds down to 4.
    let reference = loss_at(16);
    for b in [4, 6, 8] {
        assert!((loss_at(b) - reference).abs() < 1e-5, "eval batch {b}: {} vs {reference}", loss_at(b));
    }
    // With the whole eval batch as one group (the old behaviour), the loss moves with the batch.
    let mut whole = cfg.clone();
    whole.model.group_size = None;
    let whole_at = |eval_batch_size: usize| {
        let c = RunConfig { train: TrainConfig { eval_batch_size, ..whole.train.clone() }, ..whole.clone() };
        evaluate(&model_of(&whole), &ds, &c, switch_data::Split::Validation).0
    };
    assert!((whole_at(4) - whole_at(16)).abs() > 1e-3, "tokens must be dropped, or this test proves nothing");
}

fn model_of(cfg: &RunConfig) -> switch_model::SwitchTransformer<Dev> {
    switch_model::SwitchTransformer::new(&Dev::default(), &cfg.model, 0).unwrap()
}

#[test]
fn the_capacity_grid_matches_switch_plus_flops_within_one_percent() {
    // d_model moves by 1, so the solved Switch+ point meets the default 1% tolerance.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/capacity.yaml");
    let plan = switch_runner::plan(&path).expect("capacity.yaml plans with the default tolerance");
    let plus = plan.runs.iter().find(|r| r.config.model.d_model != 64).expect("a solved Switch+ point");
    let moe = plan.runs.iter().find(|r| r.config.model.top_k == 2 && r.config.model.capacity_factor == 1.0).unwrap();
    let ratio = plus.accounting.flops_per_token / moe.accounting.flops_per_token;
    assert!((ratio - 1.0).abs() < 0.01, "Switch+ / MoE FLOPs = {ratio}");
}

#[test]
fn dfdx_buffer_cache_changes_no_number() {
    // Training enables dfdx's buffer cache for speed; the weights after a few steps must be the
    // same bits as without it.
    use dfdx::prelude::*;
    use switch_runner::train::{to_batch, train_step};
    let tmp = tempfile::tempdir().unwrap();
    let plan = switch_runner::plan(&write_grid(tmp.path(), "points:\n  - { model.num_experts: 4 }\n")).unwrap();
    let cfg = plan.runs[0].config.clone();
    let ds = switch_data::Dataset::build(&cfg.data, &tmp.path().join("cache")).unwrap();
    let weights_after_steps = |cache: bool| {
        let dev = Dev::default();
        if cache {
            dev.enable_cache();
        }
        let mut model = switch_model::SwitchTransformer::new(&dev, &cfg.model, 0).unwrap();
        let sizes: Vec<usize> = model.params_mut().iter().map(|(_, p)| p.shape().0).collect();
        let mut opt = OptimizerState::adamw(&sizes);
        for s in 0..3 {
            let batch = to_batch(ds.train_batch(0, s, cfg.train.batch_size), &cfg);
            train_step(&mut model, &mut opt, &batch, &cfg, s).unwrap();
        }
        model.params_mut().iter().map(|(_, p)| p.as_vec()).collect::<Vec<_>>()
    };
    assert_eq!(weights_after_steps(true), weights_after_steps(false));
}

#[test]
fn train_step_equals_clipping_and_adamw_on_plain_host_copies() {
    // train_step reads gradients in place and reuses buffers; the plain path copies everything.
    use dfdx::prelude::*;
    use switch_model::nn::Ctx;
    use switch_runner::train::{to_batch, train_step};
    let tmp = tempfile::tempdir().unwrap();
    let plan = switch_runner::plan(&write_grid(tmp.path(), "points:\n  - { model.num_experts: 4 }\n")).unwrap();
    let mut cfg = plan.runs[0].config.clone();
    cfg.train.grad_clip = 0.05; // small enough to clip
    let ds = switch_data::Dataset::build(&cfg.data, &tmp.path().join("cache")).unwrap();
    let batch = to_batch(ds.train_batch(0, 0, cfg.train.batch_size), &cfg);
    let new_model = || switch_model::SwitchTransformer::new(&Dev::default(), &cfg.model, 0).unwrap();
    let weights = |m: &mut switch_model::SwitchTransformer<Dev>| {
        m.params_mut().iter().map(|(_, p)| p.as_vec()).collect::<Vec<_>>()
    };

    let mut fast = new_model();
    let sizes: Vec<usize> = fast.params_mut().iter().map(|(_, p)| p.shape().0).collect();
    let buffers = |m: &mut switch_model::SwitchTransformer<Dev>| {
        m.params_mut().iter().map(|(_, p)| p.host_slice().as_ptr()).collect::<Vec<_>>()
    };
    let before = buffers(&mut fast);
    train_step(&mut fast, &mut OptimizerState::adamw(&sizes), &batch, &cfg, 0).unwrap();
    // updated in place: no forward or backward op still shares a weight's buffer at update time
    // (if one did, the update would copy the buffer first)
    assert_eq!(buffers(&mut fast), before);

    let mut plain = new_model();
    let mut ctx = Ctx::train(switch_data::fnv1a(b"step-0-0")).with_kernels(cfg.train.kernels);
    let grads = plain.loss::<OwnedTape<f32, Dev>>(&batch, &mut ctx).total.backward();
    let mut gs: Vec<Vec<f32>> = plain.params_mut().iter().map(|(_, p)| grads.get(&**p).as_vec()).collect();
    let mut params = weights(&mut plain);
    let norm = gs.iter().flatten().map(|g| (*g as f64).powi(2)).sum::<f64>().sqrt();
    assert!(norm > cfg.train.grad_clip, "the test must clip");
    gs.iter_mut().flatten().for_each(|g| *g *= (cfg.train.grad_clip / norm) as f32);
    OptimizerState::adamw(&sizes).step(&mut params, &gs, 1, cfg.train.learning_rate_at(0), &cfg.train);
    assert_eq!(weights(&mut fast), params);
}

/// `train.router_learning_rate` moves the routers alone: 0 freezes them while everything else
/// trains, and a value equal to `learning_rate` gives the bits of leaving it unset.
#[test]
fn a_router_learning_rate_applies_to_the_routers_only() {
    use dfdx::prelude::*;
    use switch_runner::train::{to_batch, train_step};
    let tmp = tempfile::tempdir().unwrap();
    let plan = switch_runner::plan(&write_grid(tmp.path(), "points:\n  - { model.num_experts: 4 }\n")).unwrap();
    let base = plan.runs[0].config.clone();
    let set = write_grid(tmp.path(), "points:\n  - { model.num_experts: 4, train.router_learning_rate: 0.0 }\n");
    assert_eq!(switch_runner::plan(&set).unwrap().runs[0].config.train.router_learning_rate, Some(0.0));
    let ds = switch_data::Dataset::build(&base.data, &tmp.path().join("cache")).unwrap();
    let batch = to_batch(ds.train_batch(0, 0, base.train.batch_size), &base);
    let after_steps = |router_lr: Option<f64>| {
        let mut cfg = base.clone();
        cfg.train.router_learning_rate = router_lr;
        let mut m = switch_model::SwitchTransformer::new(&Dev::default(), &cfg.model, 0).unwrap();
        let sizes: Vec<usize> = m.params_mut().iter().map(|(_, p)| p.shape().0).collect();
        let mut opt = OptimizerState::adamw(&sizes);
        for step in 0..2 {
            train_step(&mut m, &mut opt, &batch, &cfg, step).unwrap();
        }
        m.params_mut().into_iter().map(|(n, p)| (n, p.as_vec())).collect::<Vec<_>>()
    };
    let start = {
        let mut m = switch_model::SwitchTransformer::new(&Dev::default(), &base.model, 0).unwrap();
        m.params_mut().into_iter().map(|(n, p)| (n, p.as_vec())).collect::<Vec<_>>()
    };
    let unset = after_steps(None);
    assert_eq!(after_steps(Some(base.train.learning_rate)), unset);
    let frozen = after_steps(Some(0.0));
    for ((name, before), (_, after)) in start.iter().zip(&frozen) {
        if name.ends_with(".moe.router") {
            assert_eq!(before, after, "{name} moved at router_learning_rate 0");
        } else if !name.ends_with("norm") {
            assert_ne!(before, after, "{name} did not train");
        }
    }
    assert!(frozen.iter().any(|(n, _)| n.ends_with(".moe.router")));
}

#[test]
fn optimizer_steps_and_the_gradient_norm_keep_their_bits_on_any_number_of_threads() {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use switch_runner::optim::sum_of_squares;
    // Four stacked [128, 160] matrices: several chunks of the threaded loops and sums.
    let shape = [4, 128, 160];
    let n: usize = shape.iter().product();
    for kind in [OptimizerKind::Adamw, OptimizerKind::Adafactor] {
        let cfg = TrainConfig { optimizer: kind, ..Default::default() };
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let mut rng = StdRng::seed_from_u64(11);
                let mut opt = OptimizerState::new(kind, &[shape]);
                let mut p: Vec<f32> = (0..n).map(|_| rng.gen_range(-0.1..0.1)).collect();
                let mut norms = Vec::new();
                for t in 1..=3 {
                    let g: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
                    norms.push(sum_of_squares(&g).to_bits());
                    opt.update(0, &mut p, &g, 0.7, t, 0.01, &cfg);
                }
                (p.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), norms)
            })
        };
        let one = run(1);
        assert_eq!(one, run(2), "{kind:?}: 1 and 2 threads differ");
        assert_eq!(one, run(3), "{kind:?}: 1 and 3 threads differ");
    }
    // And the sum itself is right: Σ x² of 0, 1, …, 99_999 in closed form.
    let x: Vec<f32> = (0..100_000).map(|i| i as f32).collect();
    let exact = 99_999.0 * 100_000.0 * 199_999.0 / 6.0;
    assert!((sum_of_squares(&x) - exact).abs() < 1e-9 * exact);
}

/// The optimizer's and the gradient norm's loops run compiled for AVX2 where the CPU has it
/// (`switch_model::simd::wide`): the same bits as the same arithmetic written out here, which this
/// test crate compiles for baseline x86-64.
#[test]
fn wide_loops_keep_every_bit() {
    // Σg² in f64: chunks of 2¹⁵ summed in order, each in eight interleaved lanes plus its tail;
    // nine whole chunks and a part, on 1, 2 and 3 threads.
    let n = 9 * (1 << 15) + 1003;
    let g: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 0.01).collect();
    let reference: f64 = g
        .chunks(1 << 15)
        .map(|c| {
            let mut lanes = [0f64; 8];
            let tail = c.chunks_exact(8).remainder().iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
            for x8 in c.chunks_exact(8) {
                for (lane, &x) in lanes.iter_mut().zip(x8) {
                    *lane += (x as f64) * (x as f64);
                }
            }
            lanes.iter().sum::<f64>() + tail
        })
        .sum();
    // Sums whose order shows in their bits (the data above cannot tell orders apart): 1 + b + b
    // rounds to 1 + 2u (u = 2⁻⁵², b = 0.5625u), b + b + 1 to 1 + u. Each places 1 and two b's (the
    // squares of 1 and 1.5·2⁻²⁷) where a sum in reverse order would add the b's first: in three
    // chunks, in three lanes of one chunk, and in chunks far apart and the tail (the threads' parts).
    let xb = 1.5 * 2f32.powi(-27);
    let with = |at: [usize; 3]| {
        let mut x = vec![0f32; n];
        (x[at[0]], x[at[1]], x[at[2]]) = (1.0, xb, xb);
        x
    };
    let (u, chunk) = (2f64.powi(-52), 1 << 15);
    let ordered = [
        (with([0, chunk, 2 * chunk]), "the chunks"),
        (with([0, 1, 2]), "a chunk's lanes"),
        (with([chunk, 5 * chunk, 9 * chunk + 1001]), "the threads' parts and the tail"),
    ];
    for threads in 1..=3 {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let sum = |x: &[f32]| pool.install(|| switch_runner::optim::sum_of_squares(x));
        assert_eq!(sum(&g).to_bits(), reference.to_bits(), "Σg² on {threads} thread(s)");
        for (x, what) in &ordered {
            assert_eq!(sum(x), 1.0 + 2.0 * u, "{what} summed out of order on {threads} thread(s)");
        }
    }
    // AdamW, three steps.
    let cfg = TrainConfig { weight_decay: 0.01, ..Default::default() };
    let (mut p, mut m, mut v) = (vec![0.5f32; n], vec![0f32; n], vec![0f32; n]);
    let mut opt = OptimizerState::adamw(&[n]);
    let mut q = vec![vec![0.5f32; n]];
    for t in 1..=3u64 {
        let (b1, b2) = (cfg.beta1 as f32, cfg.beta2 as f32);
        let (c1, c2) = (1.0 - cfg.beta1.powi(t as i32) as f32, 1.0 - cfg.beta2.powi(t as i32) as f32);
        let (lr, wd) = (1e-3f32, cfg.weight_decay as f32);
        for i in 0..n {
            m[i] = b1 * m[i] + (1.0 - b1) * g[i];
            v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
            p[i] -= lr * ((m[i] / c1) / ((v[i] / c2).sqrt() + 1e-8) + wd * p[i]);
        }
        opt.step(&mut q, std::slice::from_ref(&g), t, 1e-3, &cfg);
    }
    assert!(q[0].iter().zip(&p).all(|(a, b)| a.to_bits() == b.to_bits()), "AdamW's bits differ");
    assert!(opt.m[0].iter().zip(&m).all(|(a, b)| a.to_bits() == b.to_bits()));
}
