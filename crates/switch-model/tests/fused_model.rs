//! A whole model, dense and Switch, with the fused kernels (with and without the fused router) and
//! with the plain dfdx ops: the same
//! loss and the same gradient for every parameter, within float reordering. Alone in its test
//! binary because it poisons, for the whole process, every buffer a fused kernel is to overwrite
//! (outputs, gradients it writes first) with NaN: an element left unwritten shows.
use dfdx::prelude::*;
use switch_model::kernels::{set_poison_overwrites, KernelMode};
use switch_model::nn::Ctx;
use switch_model::{ModelConfig, SwitchTransformer};

mod common;
use common::batch;

/// Total loss and every parameter's gradient, by name.
fn loss_and_grads(cfg: &ModelConfig, kernels: KernelMode) -> (f32, Vec<(String, Vec<f32>)>) {
    set_poison_overwrites(true);
    let dev = Cpu::default();
    dev.enable_cache(); // as training runs: buffers come back from the cache with stale values
    let mut model = SwitchTransformer::new(&dev, cfg, 7).unwrap();
    let encoder_len = if cfg.is_decoder_only() { 0 } else { 12 };
    let out =
        model.loss::<OwnedTape<f32, Cpu>>(&batch(cfg, 4, encoder_len, 6, 3), &mut Ctx::train(11).with_kernels(kernels));
    let total = out.total.as_vec()[0];
    let grads = out.total.backward();
    let named = model.params_mut().into_iter().map(|(name, p)| (name.to_string(), grads.get(&*p).as_vec())).collect();
    (total, named)
}

#[test]
fn fused_and_plain_kernels_train_the_same_model() {
    // Encoder-decoder dense and Switch, and a decoder-only Switch model (no cross-attention);
    // d_ff 128 takes fused_slots' own loops (widths of multiples of 16) where the CPU has AVX-512;
    // the last is top-2 GEGLU routed in two groups (each expert's slots in two segments).
    for (experts, encoder_layers, d_ff, top2_geglu_groups) in
        [(1, 2, 24, false), (4, 2, 24, false), (4, 0, 24, false), (4, 2, 128, false), (4, 2, 128, true)]
    {
        let routed = |cfg: ModelConfig| {
            if top2_geglu_groups {
                ModelConfig { top_k: 2, activation: switch_model::Activation::Geglu, group_size: Some(2), ..cfg }
            } else {
                cfg
            }
        };
        let cfg = routed(ModelConfig {
            vocab_size: 50,
            d_model: 16,
            d_ff,
            num_heads: 2,
            d_kv: 8,
            num_encoder_layers: encoder_layers,
            num_decoder_layers: 2,
            num_experts: experts,
            expert_every: 1,
            z_loss_coef: 0.01,
            init_scale: 1.0,
            ..Default::default()
        });
        let plain = loss_and_grads(&cfg, KernelMode::Plain);
        for mode in [KernelMode::Fused, KernelMode::FusedRouter, KernelMode::FusedSlots] {
            let fused = loss_and_grads(&cfg, mode);
            let what = format!("{experts} experts, {mode:?}");
            assert!((fused.0 - plain.0).abs() < 1e-5 * plain.0.abs(), "{what}: loss {} vs {}", fused.0, plain.0);
            assert_eq!(fused.1.len(), plain.1.len());
            for ((name, f), (_, p)) in fused.1.iter().zip(&plain.1) {
                let scale = p.iter().fold(0f32, |a, b| a.max(b.abs()));
                assert!(scale > 0.0, "{what}: {name} gets no gradient");
                for (a, b) in f.iter().zip(p) {
                    assert!((a - b).abs() <= 1e-4 * scale, "{what}: {name}: {a} vs {b} (largest {scale})");
                }
            }
        }
    }
}
