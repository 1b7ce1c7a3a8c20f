//! RMSNorm, `y = x · w / √(mean(x²) + ε)` per row: as dfdx ops (the reference) and fused, one
//! pass each way with its rows on the run's threads.
use super::rows::ELEMENTWISE_CHUNK;
use super::{data, with_overwritten_output, RMS_EPS};
use crate::tensor::{Act, Param, Tp};
use crate::wide;
use dfdx::prelude::*;
use rayon::prelude::*;

/// RMSNorm as dfdx ops (the reference): square, mean, +ε, √, 1/·, two broadcasts, two products.
pub fn rms_norm_plain<D: Device<f32>, T: Tp<D>>(x: Act<D, T>, w: &Param<D>) -> Act<D, T> {
    let shape = *x.shape();
    let (x, tape) = x.split_tape();
    let inv_rms = (x.clone().put_tape(tape).square().mean::<(usize,), Axis<1>>() + RMS_EPS).sqrt().recip();
    inv_rms.broadcast_like::<_, Axis<1>>(&shape) * x * w.clone().broadcast_like::<_, Axis<0>>(&shape)
}

/// RMSNorm in one pass each way. With r = 1/√(mean(x²) + ε) per row and g = ∂L/∂y:
/// ∂L/∂x = r·(g⊙w) − x·r³·mean(g⊙w⊙x), ∂L/∂w = Σ_rows g⊙x·r.
///
/// Rows go to the run's threads in chunks; ∂w's sum runs over the rows in order for each column,
/// its columns split between the threads, so every bit is the same on any number of threads.
pub fn rms_norm_fused<T: Tp<Cpu>>(x: Act<Cpu, T>, w: &Param<Cpu>) -> Act<Cpu, T> {
    let (n, d) = *x.shape();
    let dev = x.device().clone();
    let (x, mut tape) = x.split_tape();
    let chunk = (ELEMENTWISE_CHUNK / d).max(1) * d;
    let mut inv = vec![0f32; n];
    let out = with_overwritten_output(&dev, (n, d), |y| {
        let ws = data(w);
        let rows = y.par_chunks_mut(chunk).zip(data(&x).par_chunks(chunk));
        rows.zip(inv.par_chunks_mut(chunk / d)).for_each(|((y, xs), inv)| wide!(|| normalize(xs, ws, inv, y)));
    });
    let (x_ghost, w_ghost, out_ghost) = (x.ghost(), w.ghost(), out.ghost());
    let w = w.clone(); // shares the weights' buffer until the backward pass has run
    tape.add_backward_op(move |grads| {
        let (xs, ws) = (data(&x), data(&w));
        let gw = {
            let (gx, add, g) = input_for_overwrite_and_output_grads!(grads, &x_ghost, &out_ghost);
            assert_eq!(gx.len(), n * d, "rms_norm_fused needs a contiguous input");
            let rows = gx.par_chunks_mut(chunk).zip(xs.par_chunks(chunk)).zip(g.par_chunks(chunk));
            rows.zip(inv.par_chunks(chunk / d))
                .for_each(|(((gx, xs), g), inv)| wide!(|| input_grad(xs, g, ws, inv, gx, add)));
            weight_grad(xs, g, &inv, d)
        };
        for (a, b) in grads.get_or_alloc_mut(&w_ghost)?.iter_mut().zip(&gw) {
            *a += b;
        }
        Ok(())
    });
    out.put_tape(tape)
}

/// `y = x · w · r` for rows of `x`, keeping each row's r in `inv`.
#[inline(always)]
fn normalize(xs: &[f32], ws: &[f32], inv: &mut [f32], y: &mut [f32]) {
    let d = ws.len();
    for ((row, out), r) in xs.chunks_exact(d).zip(y.chunks_exact_mut(d)).zip(inv) {
        *r = 1.0 / (row.iter().map(|v| v * v).sum::<f32>() / d as f32 + RMS_EPS).sqrt();
        for ((o, v), wj) in out.iter_mut().zip(row).zip(ws) {
            *o = *r * v * wj;
        }
    }
}

/// ∂x for rows of `x`, added into `gx` or, where this is its first writer, written as `0 + v`
/// (dfdx's zero fill and add, without the fill).
#[inline(always)]
fn input_grad(xs: &[f32], g: &[f32], ws: &[f32], inv: &[f32], gx: &mut [f32], add: bool) {
    let d = ws.len();
    for (((row, gy), gxr), &r) in xs.chunks_exact(d).zip(g.chunks_exact(d)).zip(gx.chunks_exact_mut(d)).zip(inv) {
        let dot: f32 = row.iter().zip(gy).zip(ws).map(|((v, g), wj)| g * wj * v).sum::<f32>() / d as f32;
        let k = r * r * r * dot;
        let v = |j: usize| r * gy[j] * ws[j] - row[j] * k;
        if add {
            gxr.iter_mut().enumerate().for_each(|(j, a)| *a += v(j));
        } else {
            gxr.iter_mut().enumerate().for_each(|(j, a)| *a = 0.0 + v(j));
        }
    }
}

/// ∂w = Σ_rows g⊙x·r, summed over the rows in order; the columns are split between the threads.
fn weight_grad(xs: &[f32], g: &[f32], inv: &[f32], d: usize) -> Vec<f32> {
    let mut gw = vec![0f32; d];
    let cols = d.div_ceil(rayon::current_num_threads());
    gw.par_chunks_mut(cols).enumerate().for_each(|(c, gw)| {
        let at = c * cols;
        wide!(|| {
            for ((row, gy), &r) in xs.chunks_exact(d).zip(g.chunks_exact(d)).zip(inv) {
                for ((a, gy), v) in gw.iter_mut().zip(&gy[at..]).zip(&row[at..]) {
                    *a += gy * v * r;
                }
            }
        })
    });
    gw
}
