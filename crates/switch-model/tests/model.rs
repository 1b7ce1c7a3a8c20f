//! Checks of the model against independent evidence: published parameter counts, finite
//! differences, hand-worked routing and the paper's invariants.
use dfdx::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use switch_model::kernels::KernelMode;
use switch_model::moe::{load_balancing_loss, route, route_in_groups, router_z_loss, MoeLayer};
use switch_model::nn::{Ctx, ExpertFfn, Linear, Role};
use switch_model::t5::relative_position_bucket;
use switch_model::{Activation, Batch, ModelConfig, RoutingPriority, SwitchTransformer};

mod common;
use common::batch;

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
    // Decoder-only: self-attention, feed-forward and logits, no cross-attention.
    let decoder_only = ModelConfig { num_encoder_layers: 0, ..cfg }.accounting(0, 3);
    let dec = ld * (8.0 * d * h + 4.0 * ld * h) + ld * 4.0 * d * f;
    assert_eq!(decoder_only.flops_per_example, dec + logits);
    assert_eq!(decoder_only.flops_per_token, decoder_only.flops_per_example / 3.0);
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
        assert_eq!(
            m.params_mut().iter().map(|(_, t)| t.shape().0 as u64).sum::<u64>(),
            cfg.accounting(6, 4).params_total,
            "{cfg:?}"
        );
    }
    // Decoder-only: no encoder stack, no cross-attention.
    let cfg = ModelConfig { num_encoder_layers: 0, ..tiny(4) };
    let mut m = SwitchTransformer::new(&dev, &cfg, 0).unwrap();
    let names: Vec<String> = m.params_mut().into_iter().map(|(n, _)| n).collect();
    assert!(names.iter().all(|n| !n.starts_with("encoder") && !n.contains("cross_attn")), "{names:?}");
    let total: u64 = m.params_mut().iter().map(|(_, t)| t.shape().0 as u64).sum();
    assert_eq!(total, cfg.accounting(0, 4).params_total);
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
    let out = layer.forward(x(), &[], usize::MAX, &mut Ctx::eval());
    let y = out.output.as_vec();
    let expected =
        [2.0 * s(1.0), s(1.0), 2.0 * s(2.0), 6.0 * s(2.0), 3.0 * s(2.0), s(2.0), 0.0, 0.0, 0.0, 2.0 * s(1.0), 0.0, 0.0];
    for (a, b) in y.iter().zip(expected) {
        assert!((a - b).abs() < 1e-6, "{y:?} vs {expected:?}");
    }
    let stats = &out.routing;
    assert_eq!(stats.load_fraction, vec![0.5, 0.5]);
    assert!((stats.drop_fraction - 2.0 / 6.0).abs() < 1e-6);

    // Batch-prioritized: the confident token 3 displaces token 0; token 5 is still dropped.
    let layer = hand_layer(&dev, RoutingPriority::BatchPrioritized);
    let y = layer.forward(x(), &[], usize::MAX, &mut Ctx::eval()).output.as_vec();
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
    let y = layer.forward(x, &[], usize::MAX, &mut Ctx::eval()).output.as_vec();
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
    let out = layer.forward(x, &[], usize::MAX, &mut Ctx::eval());
    assert!((out.balance_loss.as_vec()[0] - alpha).abs() < 1e-7);
    // Every token certain of expert 0: f = P = (1, 0), loss = α·N.
    let x = dev.tensor_from_vec(vec![50.0f32, 0.0, 60.0, 0.0, 70.0, 0.0, 80.0, 0.0], (4usize, 2usize));
    let out = layer.forward(x, &[], usize::MAX, &mut Ctx::eval());
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
    let sparse = layer.forward(x.clone(), &[], usize::MAX, &mut Ctx::eval()).output.as_vec();
    let dense = dense.forward(x.reshape_like(&(1, 7, 6)), None, 0.0, &mut Ctx::eval()).as_vec();
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
    let eval_a = layer.forward(x.clone(), &[], usize::MAX, &mut Ctx::eval()).output.as_vec();
    let mut other = Ctx::eval();
    other.rng = StdRng::seed_from_u64(99);
    assert_eq!(
        eval_a,
        layer.forward(x.clone(), &[], usize::MAX, &mut other).output.as_vec(),
        "no randomness in evaluation"
    );
    let train = layer.forward(x.clone(), &[], usize::MAX, &mut Ctx::train(5)).output.as_vec();
    assert_ne!(eval_a, train, "jitter changes the router in training");
    // With ε = 0 training and evaluation agree (same capacity, no dropout): jitter is the only difference.
    let mut plain = MoeLayer::new(&dev, &mut StdRng::seed_from_u64(1), &cfg);
    plain.jitter_eps = 0.0;
    assert_eq!(eval_a, plain.forward(x, &[], usize::MAX, &mut Ctx::train(5)).output.as_vec());
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

/// Each sparse layer hands back its routing statistics tagged with its name, in model order.
#[test]
fn routing_statistics_come_back_named_by_layer() {
    let dev = Dev::default();
    for (every, names) in
        [(1, vec!["encoder.0", "encoder.1", "decoder.0", "decoder.1"]), (2, vec!["encoder.1", "decoder.1"])]
    {
        let cfg = ModelConfig { expert_every: every, ..tiny(4) };
        let out =
            SwitchTransformer::new(&dev, &cfg, 0).unwrap().loss::<NoneTape>(&batch(&cfg, 2, 6, 4, 1), &mut Ctx::eval());
        assert_eq!(out.routing.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), names);
        for (_, r) in &out.routing {
            assert!((r.load_fraction.iter().sum::<f32>() - 1.0).abs() < 1e-6 && r.load_fraction.len() == 4);
        }
    }
}

/// `router: hash` sends each token id to a fixed expert in every layer: the loads are those of the
/// hash over the batch's ids, the router gets no gradient and the router losses are 0, while
/// everything else still trains. Top-2 is refused.
#[test]
fn hash_routing_follows_token_ids_and_leaves_the_router_untrained() {
    use switch_model::moe::hash_choices;
    use switch_model::Router;
    let dev = Dev::default();
    let cfg = ModelConfig { router: Router::Hash, capacity_factor: 8.0, eval_capacity_factor: 8.0, ..tiny(4) };
    let b = batch(&cfg, 2, 6, 4, 3);
    let mut m = SwitchTransformer::new(&dev, &cfg, 0).unwrap();
    let out = m.loss::<OwnedTape<f32, Dev>>(&b, &mut Ctx::train(1));
    assert_eq!((out.balance_loss, out.z_loss), (0.0, 0.0));
    let load = |ids: &[usize]| {
        let p = hash_choices(ids, 4);
        (0..4).map(|e| p.chunks(4).filter(|row| row[e] == 1.0).count() as f32 / ids.len() as f32).collect::<Vec<_>>()
    };
    for (name, r) in &out.routing {
        let ids = if name.starts_with("encoder") { &b.encoder_ids } else { &b.decoder_input_ids };
        assert_eq!(r.load_fraction, load(ids), "{name}");
    }
    let p = hash_choices(&[5, 9, 5], 4);
    assert_eq!(p[0..4], p[8..12], "one token id, one expert");
    let grads = out.total.backward();
    for (name, param) in m.params_mut() {
        let g = grads.get(&*param).as_vec();
        let moved = g.iter().any(|v| *v != 0.0);
        assert_eq!(moved, !name.ends_with(".moe.router"), "{name}");
    }
    let top2 = ModelConfig { top_k: 2, ..cfg };
    assert_eq!(top2.validate().unwrap_err().field, "top_k");
}

/// Paired seeds: at one seed, dense and Switch models of any expert count start with the same
/// shared (non-feed-forward) weights; another seed changes every one of them.
#[test]
fn shared_weights_are_paired_across_expert_counts() {
    let dev = Dev::default();
    let shared = |e: usize, seed: u64| -> Vec<(String, Vec<f32>)> {
        let mut m = SwitchTransformer::new(&dev, &ModelConfig { expert_every: 2, ..tiny(e) }, seed).unwrap();
        m.params_mut()
            .into_iter()
            .filter(|(n, _)| !n.contains(".ffn.") && !n.contains(".moe."))
            .map(|(n, p)| (n, p.as_vec()))
            .collect()
    };
    let dense = shared(1, 3);
    assert!(dense.iter().any(|(n, _)| n == "decoder.1.cross_attn.q"));
    assert_eq!(dense, shared(2, 3));
    assert_eq!(dense, shared(8, 3));
    let other = shared(1, 4);
    for ((n, a), (_, b)) in dense.iter().zip(&other) {
        // Norm weights start at 1 whatever the seed.
        assert!(n.ends_with("norm") || a != b, "{n} did not change with the seed");
    }
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
        let centre = loss(&m);
        let mut rng = StdRng::seed_from_u64(4);
        let (mut checked, mut kinks) = (0, 0);
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
                let tol = 0.03 * (g[i].abs() as f64) + 2e-4;
                // A token that changes expert (or top-2 choice) within ±eps puts a kink in the
                // loss: the one-sided slopes then disagree, and the entry is not comparable.
                let (forward, backward) = ((up - centre) / eps as f64, (centre - down) / eps as f64);
                if (forward - backward).abs() > 2.0 * tol {
                    kinks += 1;
                    continue;
                }
                let numeric = (up - down) / (2.0 * eps as f64);
                assert!((numeric - g[i] as f64).abs() < tol, "{name}[{i}]: numeric {numeric}, analytic {}", g[i]);
                checked += 1;
            }
        }
        assert!(checked > 50 && kinks * 10 < checked, "{checked} entries checked, {kinks} at kinks");
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
        let logits = layer.router.forward(x.clone(), KernelMode::Fused).as_vec();
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
        (ModelConfig { num_heads: 0, ..Default::default() }, "num_heads"),
        (ModelConfig { group_size: Some(0), ..Default::default() }, "group_size"),
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

#[test]
fn d_model_need_not_be_a_multiple_of_num_heads() {
    // Attention projects to num_heads × d_kv, whatever d_model is.
    let cfg = ModelConfig { d_model: 9, num_heads: 2, d_kv: 4, ..tiny(2) };
    let m = SwitchTransformer::new(&Dev::default(), &cfg, 0).unwrap();
    let out = m.loss::<NoneTape>(&batch(&cfg, 2, 6, 4, 0), &mut Ctx::eval());
    assert!(out.cross_entropy.is_finite());
}

#[test]
fn initial_attention_logits_have_t5s_scale_whatever_d_kv() {
    // T5 folds 1/√d_kv into the query init: q·k over d_kv dimensions then has std ≈ init_scale
    // on unit-variance inputs (× 0.774 for the two 2σ-truncated normals), not init_scale·√d_kv.
    let dev = Dev::default();
    for d_kv in [16, 64] {
        let cfg = ModelConfig { d_model: 128, num_heads: 2, d_kv, init_scale: 0.1, ..Default::default() };
        let m = SwitchTransformer::new(&dev, &cfg, 7).unwrap();
        let attn = &m.encoder.blocks[0].self_attn;
        let x: Tensor<(usize, usize), f32, Dev> = dev.sample_normal_like(&(256, 128));
        let q = attn.q.forward(x.clone(), KernelMode::Fused).as_vec();
        let k = attn.k.forward(x, KernelMode::Fused).as_vec();
        let h = 2 * d_kv;
        // logits of token pairs (i, i+1) in head 0
        let logits: Vec<f64> =
            (0..255).map(|i| (0..d_kv).map(|j| q[i * h + j] as f64 * k[(i + 1) * h + j] as f64).sum()).collect();
        let std = (logits.iter().map(|l| l * l).sum::<f64>() / logits.len() as f64).sqrt();
        assert!((0.05..0.11).contains(&std), "d_kv {d_kv}: initial logit std {std}, T5 gives ≈ 0.077");
    }
}

#[test]
fn relative_position_buckets_match_t5_by_hand() {
    // Encoder: 32 buckets split by direction, 8 exact, then 8 + ⌊ln(n/8)/ln(128/8)·8⌋, clipped at 15.
    let enc = |rel| relative_position_bucket(rel, true, 32, 128);
    // keys before the query (rel < 0) use buckets 0–15, keys after it 16–31
    assert_eq!([enc(0), enc(-1), enc(-7), enc(1), enc(7)], [0, 1, 7, 17, 23]);
    // log region: n = 8 → 8 + 0; n = 12 → 8 + ⌊0.146·8⌋ = 9; n = 20 → 8 + ⌊0.330·8⌋ = 10;
    // n = 40 → 8 + ⌊0.580·8⌋ = 12; n = 100 → 8 + ⌊0.911·8⌋ = 15
    assert_eq!([enc(-8), enc(-12), enc(-20), enc(-40), enc(-100)], [8, 9, 10, 12, 15]);
    assert_eq!([enc(20), enc(40)], [26, 28]);
    // clip at and beyond max_distance
    assert_eq!([enc(-128), enc(-1000), enc(128), enc(1000)], [15, 15, 31, 31]);
    // Decoder (causal): one direction, 16 exact, then 16 + ⌊ln(n/16)/ln(8)·16⌋; future keys share bucket 0.
    let dec = |rel| relative_position_bucket(rel, false, 32, 128);
    assert_eq!([dec(5), dec(0), dec(-5), dec(-15)], [0, 0, 5, 15]);
    // n = 20 → 16 + ⌊0.107·16⌋ = 17; n = 40 → 16 + ⌊0.441·16⌋ = 23; n = 100 → 16 + ⌊0.881·16⌋ = 30
    assert_eq!([dec(-16), dec(-20), dec(-40), dec(-100)], [16, 17, 23, 30]);
    assert_eq!([dec(-128), dec(-1000)], [31, 31]);
}

#[test]
fn balance_and_z_losses_by_hand_in_every_kernel_mode() {
    let dev = Dev::default();
    let alpha = 0.01;
    let probs = |v: Vec<f32>| dev.tensor_from_vec(v, (4usize, 2usize));
    for mode in [KernelMode::Fused, KernelMode::Plain, KernelMode::FusedRouter, KernelMode::FusedSlots] {
        let balance = |p, first: &[usize], group| load_balancing_loss(p, first, group, alpha, mode).as_vec()[0];
        // Uniform: P = f = (½, ½): α·2·(¼ + ¼) = α.
        let uniform = balance(probs(vec![0.5; 8]), &[0, 1, 0, 1], 4);
        assert!((uniform - 0.01).abs() < 1e-8, "{mode:?}: {uniform}");
        // Collapsed: every token certain of expert 0: α·N.
        let collapsed = balance(probs([1.0, 0.0].repeat(4)), &[0; 4], 4);
        assert!((collapsed - 0.02).abs() < 1e-8, "{mode:?}: {collapsed}");
        // Two groups of 2, each collapsed onto a different expert: each group's loss is α·N, so the
        // mean is α·N, though over the whole batch routing looks balanced (which would give α).
        let p = probs(vec![1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0]);
        let grouped = balance(p.clone(), &[0, 0, 1, 1], 2);
        assert!((grouped - 0.02).abs() < 1e-8, "{mode:?}: {grouped}");
        assert!((balance(p, &[0, 0, 1, 1], 4) - 0.01).abs() < 1e-8, "{mode:?}");
        // z-loss: logits (0, 0) → logsumexp = ln 2; (ln 3, 0) → ln 4.
        let logits = dev.tensor_from_vec(vec![0.0f32, 0.0, 3f32.ln(), 0.0], (2usize, 2usize));
        let z = router_z_loss(logits, 0.5, mode).as_vec()[0];
        let expected = 0.5 * (2f32.ln().powi(2) + 4f32.ln().powi(2)) / 2.0;
        assert!((z - expected).abs() < 1e-6, "{mode:?}: {z} vs {expected}");
    }
}

#[test]
fn groups_route_on_their_own() {
    // 4 tokens all preferring expert 0, capacity 1 per expert per group of 2: one token per group kept.
    let probs = [0.9, 0.1].repeat(4);
    let r = route_in_groups(&probs, 2, 1, 2, |_| 1, RoutingPriority::Position);
    assert_eq!(r.capacity, 2, "two groups' slots per expert");
    // expert 0's buffer: slot 0 = group 0's token 0, slot 1 = group 1's token 2
    assert_eq!(r.slot_of, vec![Some(0), None, Some(1), None]);
    assert_eq!(&r.slot_token[..2], &[0, 2]);
    assert_eq!(r.first_choice_counts, vec![4, 0]);
    // one group of 4: only token 0 fits
    let whole = route_in_groups(&probs, 2, 1, 4, |_| 1, RoutingPriority::Position);
    assert_eq!(whole.slot_of, vec![Some(0), None, None, None]);
}

#[test]
fn evaluation_loss_does_not_depend_on_the_evaluation_batch() {
    // Tight evaluation capacity, so tokens are dropped: with fixed groups of 2 examples, a batch
    // of 8 and four batches of 2 route every example identically.
    let dev = Dev::default();
    let cfg = ModelConfig { eval_capacity_factor: 0.5, min_expert_capacity: 1, group_size: Some(2), ..tiny(4) };
    let m = SwitchTransformer::new(&dev, &cfg, 3).unwrap();
    let all = batch(&cfg, 8, 6, 4, 11);
    let part = |i: usize| Batch {
        batch_size: 2,
        encoder_ids: all.encoder_ids[i * 12..(i + 1) * 12].to_vec(),
        decoder_input_ids: all.decoder_input_ids[i * 8..(i + 1) * 8].to_vec(),
        targets: all.targets[i * 8..(i + 1) * 8].to_vec(),
        ..all.clone()
    };
    let whole = m.loss::<NoneTape>(&all, &mut Ctx::eval()).cross_entropy;
    let parts: f32 = (0..4).map(|i| m.loss::<NoneTape>(&part(i), &mut Ctx::eval()).cross_entropy).sum::<f32>() / 4.0;
    assert!((whole - parts).abs() < 1e-5, "batch of 8: {whole}, batches of 2: {parts}");
    // the same model with the whole batch as one group does depend on the batch (the old behaviour)
    let ungrouped = SwitchTransformer::new(&dev, &ModelConfig { group_size: None, ..cfg.clone() }, 3).unwrap();
    let whole = ungrouped.loss::<NoneTape>(&all, &mut Ctx::eval()).cross_entropy;
    assert!((whole - parts).abs() > 1e-4, "drops must differ, or this test proves nothing");
}

#[test]
fn routers_learn_from_the_cross_entropy_alone() {
    // With no balance loss and no z-loss, the router's only gradient comes through the top-1
    // gate that scales the expert output; it must be there and match finite differences.
    let dev = Dev::default();
    let cfg = ModelConfig { balance_loss_coef: 0.0, z_loss_coef: 0.0, ..tiny(4) };
    let b = batch(&cfg, 2, 6, 4, 5);
    let mut m = SwitchTransformer::new(&dev, &cfg, 8).unwrap();
    let grads = m.loss::<OwnedTape<f32, Dev>>(&b, &mut Ctx::eval()).total.backward();
    let routers: Vec<(usize, Vec<f32>)> = m
        .params_mut()
        .into_iter()
        .enumerate()
        .filter(|(_, (n, _))| n.ends_with("moe.router"))
        .map(|(k, (_, p))| (k, grads.get(&*p).as_vec()))
        .collect();
    assert_eq!(routers.len(), 4, "every layer sparse");
    for (k, g) in routers {
        let i = (0..g.len()).max_by(|&a, &c| g[a].abs().total_cmp(&g[c].abs())).unwrap();
        assert!(g[i].abs() > 1e-4, "router {k} gets no gradient from the cross-entropy");
        let eps = 1e-3f32;
        let mut at = |delta: f32| {
            let mut v = m.params_mut()[k].1.as_vec();
            let original = v[i];
            v[i] = original + delta;
            m.params_mut()[k].1.copy_from(&v);
            let l = m.loss::<NoneTape>(&b, &mut Ctx::eval()).cross_entropy as f64;
            v[i] = original;
            m.params_mut()[k].1.copy_from(&v);
            l
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
        assert!((numeric - g[i] as f64).abs() < 0.05 * g[i].abs() as f64 + 2e-4, "{numeric} vs {}", g[i]);
    }
}

#[test]
fn every_parameter_carries_a_layout_with_the_init_fan_in_as_rows_and_its_role() {
    let dev = Dev::default();
    for cfg in [
        ModelConfig { d_model: 16, d_ff: 48, num_heads: 2, d_kv: 4, ..tiny(1) },
        ModelConfig { d_model: 16, d_ff: 48, num_heads: 2, d_kv: 4, expert_every: 2, init_scale: 1.0, ..tiny(3) },
        ModelConfig { d_model: 16, d_ff: 48, num_heads: 2, d_kv: 4, activation: Activation::Geglu, ..tiny(4) },
    ] {
        let mut model = SwitchTransformer::new(&dev, &cfg, 0).unwrap();
        let mut routers = 0;
        for mp in model.params() {
            let (name, shape, p) = (mp.name, mp.shape, mp.param);
            assert_eq!(shape.iter().product::<usize>(), p.shape().0, "{name}: {shape:?}");
            assert_eq!(mp.role == Role::Router, name.ends_with(".moe.router"), "{name}: {:?}", mp.role);
            assert_eq!(mp.role == Role::Expert, name.contains(".moe.w_"), "{name}: {:?}", mp.role);
            if mp.role == Role::Expert {
                assert_eq!(shape[0], cfg.num_experts, "{name}: experts stacked in the layout's batch");
            }
            routers += (mp.role == Role::Router) as usize;
            // A weight is drawn with σ = √(init_scale / fan_in), and its fan-in is its rows.
            let matrix = ["w_in", "w_gate", "w_out", "router", "o"].iter().any(|s| name.ends_with(s));
            if matrix {
                let w = p.as_vec();
                let std = (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt() as f64;
                // The truncation at 2σ leaves 0.88σ.
                let want = 0.88 * (cfg.init_scale / shape[1] as f64).sqrt();
                assert!((std / want - 1.0).abs() < 0.2, "{name}: std {std}, want {want} for rows {}", shape[1]);
            }
        }
        let sparse_layers = (0..cfg.num_encoder_layers).filter(|&i| cfg.is_sparse_layer(i)).count()
            + (0..cfg.num_decoder_layers).filter(|&i| cfg.is_sparse_layer(i)).count();
        assert_eq!(routers, sparse_layers, "one router per sparse layer");
    }
}

/// The router's choices are the first `top_k` of a stable sort by descending probability (ties to
/// the lower expert index, like argmax), on rows full of ties.
#[test]
fn routing_chooses_the_top_k_of_a_stable_sort() {
    let mut rng = StdRng::seed_from_u64(3);
    for (e, k) in [(1, 1), (3, 1), (3, 2), (3, 3), (64, 1), (128, 2)] {
        let probs: Vec<f32> = (0..40 * e).map(|_| (rng.gen_range(0..5) as f32) / 8.0).collect();
        let routing = route(&probs, e, k, 1000, RoutingPriority::Position);
        for (t, row) in probs.chunks_exact(e).enumerate() {
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            assert_eq!(routing.choices[t * k..][..k], order[..k], "{e} experts, top-{k}, token {t}: {row:?}");
        }
    }
}
