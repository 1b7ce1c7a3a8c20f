//! The router's head in one pass each way ([`KernelMode::FusedRouter`]): the softmax over experts,
//! the z-loss and the load-balancing loss's Σ p ⊙ w. As dfdx ops these are about a dozen passes
//! over `[tokens, experts]` each way, each into a fresh zeroed buffer: the largest share of a
//! step's elementwise work at 64–128 experts.
//!
//! ```
//! use dfdx::prelude::*;
//! use switch_model::kernels::{logsumexp_sq_mean_fused, softmax_rows_fused};
//! let dev: Cpu = Default::default();
//! let x = dev.tensor_from_vec(vec![0.0f32, 2f32.ln(), 0.0, 0.0], (2usize, 2usize));
//! // row 0: e⁰ : e^ln2 = 1 : 2; row 1: uniform
//! let p = softmax_rows_fused(x.clone()).as_vec();
//! assert!((p[0] - 1.0 / 3.0).abs() < 1e-6 && (p[1] - 2.0 / 3.0).abs() < 1e-6 && p[2] == 0.5);
//! // logsumexp: ln 3 and ln 2; the mean of their squares
//! let z = logsumexp_sq_mean_fused(x).as_vec()[0];
//! assert!((z - (3f32.ln().powi(2) + 2f32.ln().powi(2)) / 2.0).abs() < 1e-6);
//! ```
#[cfg(doc)]
use super::KernelMode;
use super::{data, exp, softmax_backward, softmax_row, softmax_with_bias, with_overwritten_output};
use crate::tensor::{device_tensor, Act, Tp};
use crate::wide;
use dfdx::prelude::*;

/// softmax over the last axis of `x` `[n, E]`, keeping its output for the backward pass:
/// ∂x = p ⊙ (g − Σ g ⊙ p), row by row.
pub fn softmax_rows_fused<T: Tp<Cpu>>(x: Act<Cpu, T>) -> Act<Cpu, T> {
    let (n, e) = *x.shape();
    let dev = x.device().clone();
    let (x, mut tape) = x.split_tape();
    let out = with_overwritten_output(&dev, (n, e), |p| {
        p.copy_from_slice(data(&x));
        softmax_with_bias(p, None, e)
    });
    let (x_ghost, out_ghost, probs) = (x.ghost(), out.ghost(), out.clone());
    tape.add_backward_op(move |grads| {
        let (gx, add, g) = input_for_overwrite_and_output_grads!(grads, &x_ghost, &out_ghost);
        if add {
            let mut ds = g.to_vec();
            softmax_backward(&mut ds, data(&probs), e);
            wide!(|| gx.iter_mut().zip(&ds).for_each(|(d, s)| *d += s));
        } else {
            gx.copy_from_slice(g);
            softmax_backward(gx, data(&probs), e);
        }
        Ok(())
    });
    out.put_tape(tape)
}

/// The router z-loss before its coefficient: the mean over the rows of `x` `[n, E]` of
/// logsumexp(row)². ∂x = g · 2·lse/n · softmax(row), with softmax recomputed as e^(x − lse).
pub fn logsumexp_sq_mean_fused<T: Tp<Cpu>>(x: Act<Cpu, T>) -> Tensor<(), f32, Cpu, T> {
    let (n, e) = *x.shape();
    let dev = x.device().clone();
    let (x, mut tape) = x.split_tape();
    let mut row = vec![0f32; e];
    let lse: Vec<f32> = wide!(|| {
        data(&x)
            .chunks_exact(e)
            .map(|xs| {
                row.copy_from_slice(xs);
                let (max, sum) = softmax_row(&mut row);
                max + sum.ln()
            })
            .collect()
    });
    let out = with_overwritten_output(&dev, (), |y| y[0] = lse.iter().map(|l| l * l).sum::<f32>() / n as f32);
    let (x_ghost, out_ghost) = (x.ghost(), out.ghost());
    tape.add_backward_op(move |grads| {
        let (gx, add, g) = input_for_overwrite_and_output_grads!(grads, &x_ghost, &out_ghost);
        let g = g[0];
        wide!(|| {
            for ((gx, xs), l) in gx.chunks_exact_mut(e).zip(data(&x).chunks_exact(e)).zip(&lse) {
                let scale = g * 2.0 * l / n as f32;
                for (d, x) in gx.iter_mut().zip(xs) {
                    let v = scale * exp(x - l);
                    *d = if add { *d + v } else { v };
                }
            }
        });
        Ok(())
    });
    out.put_tape(tape)
}

/// Σ x ⊙ c for a constant `c` of `x`'s shape `[n, E]` (the load-balancing loss's weights):
/// ∂x = g · c.
pub fn dot_constant_fused<T: Tp<Cpu>>(x: Act<Cpu, T>, c: &[f32]) -> Tensor<(), f32, Cpu, T> {
    let dev = x.device().clone();
    let (x, mut tape) = x.split_tape();
    assert_eq!(c.len(), data(&x).len(), "dot_constant: {} constants for {:?}", c.len(), x.shape());
    let out = with_overwritten_output(&dev, (), |y| {
        y[0] = wide!(|| data(&x).iter().zip(c).map(|(x, c)| x * c).sum());
    });
    let c = c.to_vec();
    let (x_ghost, out_ghost) = (x.ghost(), out.ghost());
    tape.add_backward_op(move |grads| {
        let (gx, add, g) = input_for_overwrite_and_output_grads!(grads, &x_ghost, &out_ghost);
        let g = g[0];
        wide!(|| {
            for (d, c) in gx.iter_mut().zip(&c) {
                *d = if add { *d + g * c } else { g * c };
            }
        });
        Ok(())
    });
    out.put_tape(tape)
}

/// softmax over the last axis as dfdx ops (the reference).
pub fn softmax_rows_plain<D: Device<f32>, T: Tp<D>>(x: Act<D, T>) -> Act<D, T> {
    x.softmax::<Axis<1>>()
}

/// mean over rows of logsumexp(row)², as dfdx ops (the reference).
pub fn logsumexp_sq_mean_plain<D: Device<f32>, T: Tp<D>>(x: Act<D, T>) -> Tensor<(), f32, D, T> {
    x.logsumexp::<(usize,), Axis<1>>().square().mean()
}

/// Σ x ⊙ c as dfdx ops (the reference): the constant as a tensor, a product, a sum.
pub fn dot_constant_plain<D: Device<f32>, T: Tp<D>>(x: Act<D, T>, c: &[f32]) -> Tensor<(), f32, D, T> {
    let c = device_tensor(x.device(), c, *x.shape());
    (x * c).sum()
}
