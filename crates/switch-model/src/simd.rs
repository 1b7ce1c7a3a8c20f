//! Wider vectors for the engine's own loops. The default build targets baseline x86-64 (SSE2, so
//! that one binary runs on every node of a cluster), and gemm picks its kernels at run time; the
//! element-wise and lane-summed loops outside gemm (the optimizer, the gradient norm, the fused
//! kernels' passes) were compiled for 128-bit vectors. [`wide`] runs a loop compiled for AVX2 when
//! the CPU has it. The arithmetic is the same instruction for instruction, only wider: Rust never
//! fuses a multiply and an add into an FMA on its own, and every sum keeps its written order (its
//! lanes are explicit), so the results keep every bit (the golden-loss test checks it).
//!
//! ```
//! let x = vec![1.5f32; 1000];
//! let sum = switch_model::simd::wide(|| x.iter().map(|v| v * v).sum::<f32>());
//! assert_eq!(sum, 2250.0);
//! ```

/// `f()`, compiled for AVX2 when this CPU has it (detected once, then a cached flag). `f` and what
/// it calls with `#[inline(always)]` are compiled into the AVX2 copy; a call it makes through a
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
