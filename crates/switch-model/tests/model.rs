//! Checks of the model against independent evidence: published parameter counts, finite
//! differences, hand-worked routing and the paper's invariants.
use dfdx::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use switch_model::moe::{route, MoeLayer};
use switch_model::nn::{Ctx, ExpertFfn, Linear};
use switch_model::{Activation, Batch, ModelConfig, RoutingPriority, SwitchTransformer};

type Dev = Cpu;

fn t5_base() -> ModelConfig {
    ModelConfig {
        vocab_size: 32128,
        d_model: 768,
        d_ff: 3072,
        num_heads: 12,
        d_kv: 64,
        num_encoder_layers: 12,
        num_decoder_layers: 12,
        ..Default::default()
    }
}

fn tiny(num_experts: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: 23,
        d_model: 8,
        d_ff: 12,
        num_heads: 2,
        d_kv: 4,
        num_encoder_layers: 2,
        num_decoder_layers: 2,
        relative_attention_num_buckets: 8,
        relative_attention_max_distance: 16,
        num_experts,
        expert_every: 1,
        capacity_factor: 4.0,
        eval_capacity_factor: 4.0,
        jitter_eps: 0.0,
        init_scale: 1.0,
        z_loss_coef: 0.01,
        ..Default::default()
    }
}

fn batch(cfg: &ModelConfig, b: usize, le: usize, ld: usize, seed: u64) -> Batch {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ids = |n: usize| (0..n).map(|_| rng.gen_range(0..cfg.vocab_size)).collect::<Vec<_>>();
    let targets = ids(b * ld);
    let mut dec = Vec::new();
    for r in 0..b {
        dec.push(0);
        dec.extend_from_slice(&targets[r * ld..(r + 1) * ld - 1]);
    }
    Batch { batch_size: b, encoder_len: le, decoder_len: ld, encoder_ids: ids(b * le), decoder_input_ids: dec, targets }
}

#[test]
fn t5_base_and_switch_base_parameter_counts_match_the_paper() {
    let base = t5_base().accounting(512, 114);
    assert!((base.params_total as f64 / 223e6 - 1.0).abs() < 0.02, "T5-Base: {}", base.params_total);
    assert_eq!(base.params_active, base.params_total);
    let switch = ModelConfig { num_experts: 128, ..t5_base() }.accounting(512, 114);
    assert!((switch.params_total as f64 / 7.4e9 - 1.0).abs() < 0.05, "Switch-Base: {}", switch.params_total);
    // Every Switch variant of T5-Base costs the same FLOPs per token as T5-Base, router aside.
    for e in [2, 4, 8, 16, 32, 64, 128, 256] {
        let s = ModelConfig { num_experts: e, ..t5_base() }.accounting(512, 114);
        assert_eq!(s.flops_per_token, base.flops_per_token, "{e} experts");
        assert!(s.router_flops_per_token > 0.0 && s.router_flops_per_token < 0.05 * s.flops_per_token);
        assert!(s.params_total > base.params_total);
        assert_eq!(s.params_active, base.params_active + 12 * 768 * e as u64, "active = dense + routers");
    }
    // top-2 MoE pays for two experts per token.
    let moe = ModelConfig { num_experts: 128, top_k: 2, ..t5_base() }.accounting(512, 114);
    assert!(moe.flops_per_token > base.flops_per_token);
}

#[test]
fn flops_match_a_hand_count() {
    // One encoder and one decoder layer, dense ReLU: count every matmul by hand.
    let cfg = ModelConfig {
        vocab_size: 10,
        d_model: 4,
        d_ff: 6,
        num_heads: 2,
        d_kv: 3,
        num_encoder_layers: 1,
        num_decoder_layers: 1,
        ..Default::default()
    };
    let (le, ld) = (5.0, 3.0);
    let (d, h, f, v) = (4.0, 6.0, 6.0, 10.0);
    let enc = le * (8.0 * d * h + 4.0 * le * h + 4.0 * d * f);
    let dec =
        ld * (8.0 * d * h + 4.0 * ld * h) + ld * (4.0 * d * h + 4.0 * le * h) + le * 4.0 * d * h + ld * 4.0 * d * f;
    let logits = ld * 2.0 * d * v;
    let a = cfg.accounting(5, 3);
    assert_eq!(a.flops_per_example, enc + dec + logits);
    assert_eq!(a.flops_per_token, a.flops_per_example / 8.0);
}

#[test]
fn built_models_have_exactly_the_accounted_parameters() {
    let dev = Dev::default();
    for cfg in [
        tiny(1),
        tiny(4),
        ModelConfig { expert_every: 2, ..tiny(3) },
        ModelConfig { top_k: 2, ..tiny(4) },
        ModelConfig { activation: Activation::Geglu, ..tiny(2) },
    ] {
        let mut m = SwitchTransformer::new(&dev, &cfg, 0).unwrap();
        assert_eq!(m.num_params() as u64, cfg.accounting(6, 4).params_total, "{cfg:?}");
    }
}

fn probs_layer(dev: &Dev, num_experts: usize, top_k: usize) -> MoeLayer<Dev> {
    let cfg = ModelConfig {
        d_model: 2,
        d_ff: 2,
        num_experts,
        top_k,
        min_expert_capacity: 1,
        jitter_eps: 0.0,
        ..Default::default()
    };
    MoeLayer::new(dev, &mut StdRng::seed_from_u64(0), &cfg)
}

/// 6 tokens, 2 experts, capacity 2, hand-set weights: router logits = x, expert 0 = relu(x),
/// expert 1 = 2·relu(x).
fn hand_layer(dev: &Dev, priority: RoutingPriority) -> MoeLayer<Dev> {
    let mut layer = probs_layer(dev, 2, 1);
    layer.router = Linear::from_rows(dev, 2, 2, &[1.0, 0.0, 0.0, 1.0]);
    layer.experts.w_in = dev.tensor_from_vec(vec![1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0], (8,));
    layer.experts.w_out = dev.tensor_from_vec(vec![1.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 2.0], (8,));
    layer.capacity_factor = 2.0 / 3.0;
    layer.eval_capacity_factor = 2.0 / 3.0;
    layer.priority = priority;
    layer
}

const HAND_TOKENS: [f32; 12] = [2.0, 1.0, 1.0, 3.0, 3.0, 1.0, 2.0, 0.0, 0.0, 1.0, 1.0, 2.0];

#[test]
fn hand_worked_routing_drops_the_right_tokens() {
    let dev = Dev::default();
    let s = |z: f32| 1.0 / (1.0 + (-z).exp()); // softmax of two logits = sigmoid of their difference
    let x = || dev.tensor_from_vec(HAND_TOKENS.to_vec(), (6usize, 2usize));

    // Position priority: expert 0 gets tokens 0, 2 (3 dropped), expert 1 gets 1, 4 (5 dropped).
    let layer = hand_layer(&dev, RoutingPriority::Position);
    let mut ctx = Ctx::eval();
    let y = layer.forward(x(), &mut ctx).output.as_vec();
    let expected =
        [2.0 * s(1.0), s(1.0), 2.0 * s(2.0), 6.0 * s(2.0), 3.0 * s(2.0), s(2.0), 0.0, 0.0, 0.0, 2.0 * s(1.0), 0.0, 0.0];
    for (a, b) in y.iter().zip(expected) {
        assert!((a - b).abs() < 1e-6, "{y:?} vs {expected:?}");
    }
    let stats = &ctx.routing[0];
    assert_eq!(stats.load_fraction, vec![0.5, 0.5]);
    assert!((stats.drop_fraction - 2.0 / 6.0).abs() < 1e-6);

    // Batch-prioritized: the confident token 3 displaces token 0; token 5 is still dropped.
    let layer = hand_layer(&dev, RoutingPriority::BatchPrioritized);
    let y = layer.forward(x(), &mut Ctx::eval()).output.as_vec();
    assert_eq!(&y[0..2], &[0.0, 0.0]);
    assert!((y[6] - 2.0 * s(2.0)).abs() < 1e-6 && y[7] == 0.0);
    assert_eq!(&y[10..12], &[0.0, 0.0]);
}

#[test]
fn top2_first_choices_fill_capacity_before_second_choices() {
    // 3 tokens, 2 experts, capacity 2: everyone prefers expert 0 except token 2.
    let probs = [0.9, 0.1, 0.8, 0.2, 0.3, 0.7];
    let r = route(&probs, 2, 2, 2, RoutingPriority::Position);
    assert_eq!(r.choices, vec![0, 1, 0, 1, 1, 0]);
    // first round: t0→e0, t1→e0, t2→e1; second round: t0→e1 (slot 3), t1→e1 full, t2→e0 full.
    assert_eq!(r.slot_of, vec![Some(0), Some(3), Some(1), None, Some(2), None]);
    assert_eq!(r.first_choice_counts, vec![2, 1]);
}

#[test]
fn top2_gates_are_renormalised() {
    let dev = Dev::default();
    let mut layer = probs_layer(&dev, 3, 2);
    layer.router = Linear::from_rows(&dev, 2, 3, &[1.0, 0.0, 0.5, 0.0, 1.0, 0.0]);
    layer.experts = ExpertFfn {
        w_in: dev.tensor_from_vec([1.0, 0.0, 0.0, 1.0].repeat(3), (12,)),
        w_gate: None,
        w_out: dev.tensor_from_vec(vec![1.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 2.0, 3.0, 0.0, 0.0, 3.0], (12,)),
        num_experts: 3,
        d_model: 2,
        d_ff: 2,
    };
    layer.eval_capacity_factor = 4.0;
    // logits (2, 0, 1): choices e0 then e2, gates p0/(p0+p2), p2/(p0+p2); outputs relu(x)·1 and ·3.
    let x = dev.tensor_from_vec(vec![2.0f32, 0.0], (1usize, 2usize));
    let y = layer.forward(x, &mut Ctx::eval()).output.as_vec();
    let (p0, p2) = (2f32.exp(), 1f32.exp());
    let expected = 2.0 * (p0 + 3.0 * p2) / (p0 + p2);
    assert!((y[0] - expected).abs() < 1e-5, "{y:?} vs {expected}");
}

#[test]
fn balance_loss_is_alpha_when_uniform_and_alpha_n_when_collapsed() {
    let dev = Dev::default();
    let alpha = 0.01f32;
    let mut layer = probs_layer(&dev, 2, 1);
    layer.router = Linear::from_rows(&dev, 2, 2, &[1.0, -1.0, -1.0, 1.0]);
    // Half the tokens lean to each expert, symmetrically: f = P = (½, ½).
    let x = dev.tensor_from_vec(vec![1.0f32, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 2.0], (4usize, 2usize));
    let out = layer.forward(x, &mut Ctx::eval());
    assert!((out.balance_loss.as_vec()[0] - alpha).abs() < 1e-7);
    // Every token certain of expert 0: f = P = (1, 0), loss = α·N.
    let x = dev.tensor_from_vec(vec![50.0f32, 0.0, 60.0, 0.0, 70.0, 0.0, 80.0, 0.0], (4usize, 2usize));
    let out = layer.forward(x, &mut Ctx::eval());
    assert!((out.balance_loss.as_vec()[0] - 2.0 * alpha).abs() < 1e-6);
}

#[test]
fn one_expert_without_dropping_equals_the_dense_layer() {
    let dev = Dev::default();
    let cfg = ModelConfig { d_model: 6, d_ff: 10, num_experts: 1, min_expert_capacity: 1, ..Default::default() };
    let mut rng = StdRng::seed_from_u64(3);
    let layer = MoeLayer::new(&dev, &mut rng, &cfg);
    let dense = ExpertFfn {
        w_in: layer.experts.w_in.clone(),
        w_gate: None,
        w_out: layer.experts.w_out.clone(),
        num_experts: 1,
        d_model: 6,
        d_ff: 10,
    };
    let x: Tensor<(usize, usize), f32, Dev> = dev.sample_normal_like(&(7, 6));
    let sparse = layer.forward(x.clone(), &mut Ctx::eval()).output.as_vec();
    let dense = dense.forward(x.reshape_like(&(1, 7, 6)), 0.0, &mut Ctx::eval()).as_vec();
    assert_eq!(sparse, dense);
}

#[test]
fn jitter_only_acts_in_training_and_never_reaches_the_experts() {
    let dev = Dev::default();
    let cfg = ModelConfig {
        d_model: 6,
        d_ff: 10,
        num_experts: 4,
        jitter_eps: 0.3,
        capacity_factor: 4.0,
        eval_capacity_factor: 4.0,
        ..Default::default()
    };
    let layer = MoeLayer::new(&dev, &mut StdRng::seed_from_u64(1), &cfg);
    let x: Tensor<(usize, usize), f32, Dev> = dev.sample_normal_like(&(16, 6));
    let eval_a = layer.forward(x.clone(), &mut Ctx::eval()).output.as_vec();
    let mut other = Ctx::eval();
    other.rng = StdRng::seed_from_u64(99);
    assert_eq!(eval_a, layer.forward(x.clone(), &mut other).output.as_vec(), "no randomness in evaluation");
    let train = layer.forward(x.clone(), &mut Ctx::train(5)).output.as_vec();
    assert_ne!(eval_a, train, "jitter changes the router in training");
    // With ε = 0 training and evaluation agree (same capacity, no dropout): jitter is the only difference.
    let mut plain = MoeLayer::new(&dev, &mut StdRng::seed_from_u64(1), &cfg);
    plain.jitter_eps = 0.0;
    assert_eq!(eval_a, plain.forward(x, &mut Ctx::train(5)).output.as_vec());
}

#[test]
fn same_seed_same_bits() {
    let dev = Dev::default();
    let cfg = ModelConfig { dropout: 0.1, expert_dropout: 0.2, jitter_eps: 0.01, ..tiny(4) };
    let b = batch(&cfg, 2, 6, 4, 1);
    let run = || {
        let mut m = SwitchTransformer::new(&dev, &cfg, 7).unwrap();
        let out = m.loss::<OwnedTape<f32, Dev>>(&b, &mut Ctx::train(11));
        let loss = out.total.as_vec();
        let grads = out.total.backward();
        let g: Vec<Vec<f32>> = m.params_mut().into_iter().map(|(_, p)| grads.get(&*p).as_vec()).collect();
        (loss, g)
    };
    assert_eq!(run(), run());
    let other = SwitchTransformer::new(&dev, &cfg, 8).unwrap();
    assert_ne!(run().0, other.loss::<OwnedTape<f32, Dev>>(&b, &mut Ctx::train(11)).total.as_vec());
}

/// Central finite differences of the full model's loss against the backward pass, for the
/// largest-gradient entry and two random entries of every parameter tensor.
#[test]
fn gradients_match_finite_differences() {
    let dev = Dev::default();
    for cfg in [tiny(4), ModelConfig { top_k: 2, activation: Activation::Geglu, ..tiny(3) }] {
        let b = batch(&cfg, 2, 6, 4, 2);
        let mut m = SwitchTransformer::new(&dev, &cfg, 3).unwrap();
        let loss = |m: &SwitchTransformer<Dev>| m.loss::<NoneTape>(&b, &mut Ctx::eval()).total.as_vec()[0] as f64;
        let out = m.loss::<OwnedTape<f32, Dev>>(&b, &mut Ctx::eval());
        let grads = out.total.backward();
        let analytic: Vec<(String, Vec<f32>)> =
            m.params_mut().into_iter().map(|(n, p)| (n, grads.get(&*p).as_vec())).collect();
        let mut rng = StdRng::seed_from_u64(4);
        let mut checked = 0;
        for (k, (name, g)) in analytic.iter().enumerate() {
            assert!(g.iter().any(|&v| v != 0.0), "{name} gets no gradient");
            let argmax = (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap();
            for i in [argmax, rng.gen_range(0..g.len()), rng.gen_range(0..g.len())] {
                let eps = 2e-3f32;
                let mut values = m.params_mut()[k].1.as_vec();
                let original = values[i];
                values[i] = original + eps;
                m.params_mut()[k].1.copy_from(&values);
                let up = loss(&m);
                values[i] = original - eps;
                m.params_mut()[k].1.copy_from(&values);
                let down = loss(&m);
                values[i] = original;
                m.params_mut()[k].1.copy_from(&values);
                let numeric = (up - down) / (2.0 * eps as f64);
                let tol = 0.03 * (g[i].abs() as f64) + 2e-4;
                assert!((numeric - g[i] as f64).abs() < tol, "{name}[{i}]: numeric {numeric}, analytic {}", g[i]);
                checked += 1;
            }
        }
        assert!(checked > 50);
    }
}

#[test]
fn router_init_scale_sets_the_initial_router_logit_spread() {
    // σ = √(s / d_model) per weight, so on inputs of unit RMS the logits have std ≈ √s (times 0.88,
    // the std of a normal truncated at 2σ); the experts keep `init_scale`.
    let dev = Dev::default();
    let x: Tensor<(usize, usize), f32, Dev> = dev.sample_normal_like(&(4096, 64));
    let logit_std = |router_init_scale: Option<f64>| {
        let cfg = ModelConfig { d_model: 64, num_experts: 8, router_init_scale, ..Default::default() };
        let layer = MoeLayer::<Dev>::new(&dev, &mut StdRng::seed_from_u64(5), &cfg);
        let logits = layer.router.forward(x.clone()).as_vec();
        let mean = logits.iter().sum::<f32>() / logits.len() as f32;
        ((logits.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / logits.len() as f32).sqrt(), layer)
    };
    let (default_std, default_layer) = logit_std(None);
    let (wide_std, wide_layer) = logit_std(Some(10.0));
    assert!((default_std - 0.88 * 0.1f32.sqrt()).abs() < 0.05, "{default_std}");
    assert!((wide_std - 0.88 * 10f32.sqrt()).abs() < 0.4, "{wide_std}");
    assert_eq!(default_layer.experts.w_in.as_vec(), wide_layer.experts.w_in.as_vec(), "experts untouched");
}

#[test]
fn bad_configs_name_the_field() {
    let cases: Vec<(ModelConfig, &str)> = vec![
        (ModelConfig { d_model: 100, num_heads: 3, ..Default::default() }, "num_heads"),
        (ModelConfig { num_experts: 0, ..Default::default() }, "num_experts"),
        (ModelConfig { capacity_factor: 0.0, ..Default::default() }, "capacity_factor"),
        (ModelConfig { capacity_factor: -1.0, ..Default::default() }, "capacity_factor"),
        (ModelConfig { num_experts: 2, top_k: 3, ..Default::default() }, "top_k"),
        (ModelConfig { expert_every: 0, ..Default::default() }, "expert_every"),
        (ModelConfig { dropout: 1.5, ..Default::default() }, "dropout"),
        (ModelConfig { router_init_scale: Some(0.0), ..Default::default() }, "router_init_scale"),
    ];
    let dev = Dev::default();
    for (cfg, field) in cases {
        let err = SwitchTransformer::new(&dev, &cfg, 0).err().expect("must fail");
        assert_eq!(err.field, field);
        assert!(err.to_string().starts_with(&format!("model.{field} = ")), "{err}");
    }
}
