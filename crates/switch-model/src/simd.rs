//! Wider vectors for the engine's own loops. The default build targets baseline x86-64 (SSE2, so
//! that one binary runs on every node of a cluster), and gemm picks its kernels at run time; the
//! element-wise and lane-summed loops outside gemm (the optimizer, the gradient norm, the fused
//! kernels' passes) were compiled for 128-bit vectors. [`wide!`](crate::wide) runs a loop compiled
//! for AVX2 when the CPU has it. The arithmetic is the same instruction for instruction, only
//! wider: Rust never fuses a multiply and an add into an FMA on its own, and every sum keeps its
//! written order (its lanes are explicit), so the results keep every bit (the golden-loss test
//! checks it).
//!
//! ```
//! let x = vec![1.5f32; 1000];
//! let sum = switch_model::wide!(|| x.iter().map(|v| v * v).sum::<f32>());
//! assert_eq!(sum, 2250.0);
//! ```
//!
//! AVX-512 is not used: on the AVX-512 machine of issue 27 the optimizer's loops compiled for it
//! ran no faster than for AVX2 (`switch-bench optimizer`, two builds alternating three times: they
//! are bound by memory and by vdivps, whose throughput per element is the same at either width).

/// `wide!(|| body)`: `body` compiled for AVX2 when this CPU has it ([`wide`](crate::simd::wide),
/// its closure marked `#[inline(always)]`). Without that mark LLVM may keep a closure a function of
/// its own, compiled for baseline x86-64: a two-chunk version of the gradient norm's loop did, and
/// ran as SSE2 code (perf); the mark makes the AVX2 copy a guarantee instead of a cost-model call.
#[macro_export]
macro_rules! wide {
    (|| $body:expr) => {
        $crate::simd::wide(
            #[inline(always)]
            || $body,
        )
    };
}

/// `f()`, compiled for AVX2 when this CPU has it (detected once, then a cached flag). `f` and what
/// it calls with `#[inline(always)]` are compiled into the AVX2 copy when `f` itself is inlined —
/// call it through [`wide!`](crate::wide), which marks the closure so; a call `f` makes through a
/// function pointer or a thread pool is not.
#[inline(always)]
pub fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { avx2(f) };
        }
    }
    f()
}
