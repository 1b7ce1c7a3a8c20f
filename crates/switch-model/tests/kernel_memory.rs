//! A fused kernel's buffers must come back to dfdx's buffer cache for reuse: a buffer the kernel
//! allocated itself would be handed to the cache on drop and never taken out again, so memory
//! would grow every training step. RMSNorm, the tied output layer and cross-entropy, as in a
//! model's last layers. Alone in its test binary, so the process's memory is its own.
use dfdx::prelude::*;
mod common;
use common::resident_bytes;
use switch_model::kernels::{cross_entropy_fused, param_matmul_fused, rms_norm_fused, Stacked};

#[cfg(target_os = "linux")] // reads /proc/self/status
#[test]
fn repeated_fused_steps_do_not_grow_memory() {
    let dev = Cpu::default();
    dev.enable_cache();
    let (n, d) = (4096, 256); // 4 MiB per activation
    let x: Tensor<(usize, usize), f32, Cpu> = dev.sample_normal_like(&(n, d));
    let w: Tensor<(usize,), f32, Cpu> = dev.ones_like(&(d,));
    let (v, vocab): (usize, Tensor<(usize,), f32, Cpu>) = (512, dev.sample_normal_like(&(512 * d,)));
    let targets: Vec<usize> = (0..n).map(|i| i % v).collect();
    let layout = Stacked { experts: 1, k: d, m: v, transposed: true };
    let step = || {
        let y = rms_norm_fused(x.clone().leaky_traced(), &w);
        let logits = param_matmul_fused(y.reshape_like(&(1, n, d)), &vocab, layout).reshape_like(&(n, v));
        let _ = cross_entropy_fused(logits, &targets).backward();
    };
    for _ in 0..10 {
        step();
    }
    let before = resident_bytes();
    for _ in 0..100 {
        step();
    }
    let grown = resident_bytes().saturating_sub(before);
    // A leak of one activation per step would be 400 MiB here.
    assert!(grown < 64 << 20, "resident memory grew by {} MiB over 100 steps", grown >> 20);
}
