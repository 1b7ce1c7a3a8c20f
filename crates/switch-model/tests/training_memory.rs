//! Training steps of a Switch model with dfdx's buffer cache on (as the runner trains) must not
//! grow memory: every per-step tensor made from host values (indices, jitter noise, masks) has to
//! take its buffer from the device, or it enters the cache on drop and is never taken out. Before
//! that fix a Switch-8 run of the `tiny` preset grew by about 1 MB per step. Alone in its test
//! binary, so the process's memory is its own.
use dfdx::prelude::*;
use switch_model::nn::Ctx;
use switch_model::{ModelConfig, SwitchTransformer};

mod common;
use common::{batch, resident_bytes};

#[cfg(target_os = "linux")] // reads /proc/self/status
#[test]
fn switch_training_steps_do_not_grow_memory() {
    let dev = Cpu::default();
    dev.enable_cache();
    let cfg = ModelConfig {
        vocab_size: 64,
        d_model: 64,
        d_ff: 64,
        num_heads: 2,
        d_kv: 16,
        num_encoder_layers: 2,
        num_decoder_layers: 2,
        num_experts: 8,
        expert_every: 1,
        ..Default::default()
    };
    let model = SwitchTransformer::new(&dev, &cfg, 0).unwrap();
    let batch = batch(&cfg, 32, 32, 8, 1);
    let step = |s: u64| {
        let out = model.loss::<OwnedTape<f32, Cpu>>(&batch, &mut Ctx::train(s));
        let _ = out.total.backward();
    };
    (0..20).for_each(step);
    let before = resident_bytes();
    (20..320).for_each(step);
    let grown = resident_bytes().saturating_sub(before);
    // Before the fix: ~0.6 MB per step here (jitter noise and four index tensors per sparse layer).
    assert!(grown < 24 << 20, "resident memory grew by {} MiB over 300 steps", grown >> 20);
}
