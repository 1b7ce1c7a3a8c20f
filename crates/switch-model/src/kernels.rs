//! Fused kernels: one pass forward and one backward where the plain dfdx composition makes a
//! fresh buffer per elementary op. Each is a dfdx op — the forward runs on the host and
//! registers its backward with `Tape::add_backward_op`, accumulating into the gradients of its
//! inputs and parameters by tensor id — and each is tested against the plain path (outputs and
//! gradients) and against finite differences.
//!
//! [`Kernels`] picks the implementation per device: the CPU gets the fused ones, any other
//! device the plain dfdx ops (its default methods). `SWITCHLAB_PLAIN_KERNELS=1` makes the CPU use
//! the plain ones too, so a benchmark can compare both in one build.
//!
//! ```
//! use dfdx::prelude::*;
//! use switch_model::kernels::{rms_norm_fused, rms_norm_plain};
//! let dev: Cpu = Default::default();
//! let x = dev.tensor_from_vec(vec![3.0f32, 4.0, 0.0, 2.0], (2usize, 2usize));
//! let w = dev.tensor_from_vec(vec![1.0f32, 2.0], (2usize,));
//! // row 0: rms = √((9 + 16) / 2) = 3.5355…; row 1: rms = √2
//! let y = rms_norm_fused(x.clone(), &w).as_vec();
//! assert!((y[0] - 0.8485).abs() < 1e-4 && (y[1] - 2.2627).abs() < 1e-4 && (y[3] - 2.8284).abs() < 1e-4);
//! assert_eq!(y, rms_norm_plain(x, &w).as_vec());
//! ```
use crate::nn::{Act, Param, Tp};
use dfdx::prelude::*;

/// ε inside T5's RMSNorm square root.
pub const RMS_EPS: f32 = 1e-6;

/// The engine's kernels for device `Self`. The defaults are the plain dfdx compositions.
pub trait Kernels: Device<f32> {
    /// `x · w / √(mean(x²) + ε)` over the last axis. `x`: `[tokens, d]`, `w`: `[d]`.
    fn rms_norm<T: Tp<Self>>(x: Act<Self, T>, w: &Param<Self>) -> Act<Self, T> {
        rms_norm_plain(x, w)
    }
}

impl Kernels for Cpu {
    fn rms_norm<T: Tp<Self>>(x: Act<Self, T>, w: &Param<Self>) -> Act<Self, T> {
        if plain_kernels() {
            rms_norm_plain(x, w)
        } else {
            rms_norm_fused(x, w)
        }
    }
}

/// `SWITCHLAB_PLAIN_KERNELS=1`: the CPU runs the plain dfdx path (read once per process).
pub fn plain_kernels() -> bool {
    static PLAIN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PLAIN.get_or_init(|| std::env::var("SWITCHLAB_PLAIN_KERNELS").is_ok_and(|v| v == "1"))
}

/// RMSNorm as dfdx ops (the reference): square, mean, +ε, √, 1/·, two broadcasts, two products.
pub fn rms_norm_plain<D: Device<f32>, T: Tp<D>>(x: Act<D, T>, w: &Param<D>) -> Act<D, T> {
    let shape = *x.shape();
    let (x, tape) = x.split_tape();
    let inv_rms = (x.clone().put_tape(tape).square().mean::<(usize,), Axis<1>>() + RMS_EPS).sqrt().recip();
    inv_rms.broadcast_like::<_, Axis<1>>(&shape) * x * w.clone().broadcast_like::<_, Axis<0>>(&shape)
}

/// A `[n, d]` tensor whose values `fill` writes. The buffer comes from the device (and so from
/// dfdx's buffer cache when it is on): a buffer made here with `vec!` would be handed to the cache
/// when the tensor drops and never taken back out, growing memory every step.
fn with_output(dev: &Cpu, (n, d): (usize, usize), fill: impl FnOnce(&mut [f32])) -> Act<Cpu, NoneTape> {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.clear();
        scratch.resize(n * d, 0.0);
        fill(scratch);
        let mut out = dev.zeros_like(&(n, d));
        out.copy_from(scratch);
        out
    })
}

/// RMSNorm in one pass each way. With r = 1/√(mean(x²) + ε) per row and g = ∂L/∂y:
/// ∂L/∂x = r·(g⊙w) − x·r³·mean(g⊙w⊙x), ∂L/∂w = Σ_rows g⊙x·r.
pub fn rms_norm_fused<T: Tp<Cpu>>(x: Act<Cpu, T>, w: &Param<Cpu>) -> Act<Cpu, T> {
    let (n, d) = *x.shape();
    let dev = x.device().clone();
    let (x, mut tape) = x.split_tape();
    let (xs, ws) = (x.as_vec(), w.as_vec());
    let mut inv = vec![0f32; n];
    let out = with_output(&dev, (n, d), |y| {
        for ((row, out), r) in xs.chunks_exact(d).zip(y.chunks_exact_mut(d)).zip(inv.iter_mut()) {
            *r = 1.0 / (row.iter().map(|v| v * v).sum::<f32>() / d as f32 + RMS_EPS).sqrt();
            for ((o, v), wj) in out.iter_mut().zip(row).zip(&ws) {
                *o = *r * v * wj;
            }
        }
    });
    let (x_ghost, w_ghost, out_ghost) = (x.ghost(), w.ghost(), out.ghost());
    tape.add_backward_op(move |grads| {
        let g: Vec<f32> = grads.get_or_alloc_mut(&out_ghost)?.to_vec();
        let mut gw = vec![0f32; d];
        {
            let gx = grads.get_or_alloc_mut(&x_ghost)?;
            assert_eq!(gx.len(), n * d, "rms_norm_fused needs a contiguous input");
            for (((row, gy), gxr), &r) in
                xs.chunks_exact(d).zip(g.chunks_exact(d)).zip(gx.chunks_exact_mut(d)).zip(&inv)
            {
                let dot: f32 = row.iter().zip(gy).zip(&ws).map(|((v, g), wj)| g * wj * v).sum::<f32>() / d as f32;
                let k = r * r * r * dot;
                for j in 0..d {
                    gxr[j] += r * gy[j] * ws[j] - row[j] * k;
                    gw[j] += gy[j] * row[j] * r;
                }
            }
        }
        for (a, b) in grads.get_or_alloc_mut(&w_ghost)?.iter_mut().zip(&gw) {
            *a += b;
        }
        Ok(())
    });
    out.put_tape(tape)
}
