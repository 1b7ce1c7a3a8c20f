//! Row moves of the Switch layer and the embedding: gathering rows (dispatch of tokens into expert
//! slots, an embedding lookup), combining expert outputs back with their gates, multiplying by
//! a constant (the router's jitter noise, a dropout mask), the residual add and ReLU. Each is
//! O(tokens × d_model); the plain
//! dfdx path makes several full-size buffers and indexes element by element, the fused one copies
//! whole rows and keeps no buffer for the backward pass.
//!
//! ```
//! use dfdx::prelude::*;
//! use switch_model::kernels::{combine_fused, gather_rows_fused};
//! let dev: Cpu = Default::default();
//! let x = dev.tensor_from_vec(vec![1.0f32, 2.0, 3.0, 4.0], (2usize, 2usize));
//! // three slots holding tokens 1, 0 and 1
//! assert_eq!(gather_rows_fused(x.clone(), &[1, 0, 1]).as_vec(), vec![3.0, 4.0, 1.0, 2.0, 3.0, 4.0]);
//! // token 0 reads slot 1 with gate 0.5; token 1 was dropped
//! let gate = dev.tensor_from_vec(vec![0.5f32, 0.9], (2usize,));
//! assert_eq!(combine_fused(x, gate, &[Some(1), None]).as_vec(), vec![1.5, 2.0, 0.0, 0.0]);
//! ```
use super::{data, with_output, with_overwritten_output, Kernels};
use crate::tensor::{device_tensor, Act, Tp};
use crate::wide;
use dfdx::prelude::*;
use rayon::prelude::*;

/// Rows by index as dfdx ops (the reference): one `gather`.
pub fn gather_rows_plain<D: Kernels, T: Tp<D>>(x: Act<D, T>, rows: &[usize]) -> Act<D, T> {
    let idx = x.device().indices(rows);
    x.gather(idx)
}

/// Row i of the output is `x[rows[i]]`, copied whole. With g = ∂L/∂y: `∂x[rows[i]] += g[i]`, in
/// order (an index may repeat).
pub fn gather_rows_fused<T: Tp<Cpu>>(x: Act<Cpu, T>, rows: &[usize]) -> Act<Cpu, T> {
    let (n, d) = *x.shape();
    assert!(rows.iter().all(|&r| r < n), "gather_rows: an index is outside the {n} rows");
    let dev = x.device().clone();
    let (x, mut tape) = x.split_tape();
    let out = with_overwritten_output(&dev, (rows.len(), d), |y| {
        let xs = data(&x);
        y.chunks_exact_mut(d).zip(rows).for_each(|(y, &r)| y.copy_from_slice(&xs[r * d..(r + 1) * d]));
    });
    let rows = rows.to_vec();
    let (x_ghost, out_ghost) = (x.ghost(), out.ghost());
    tape.add_backward_op(move |grads| {
        let (gx, g) = input_and_output_grads!(grads, &x_ghost, &out_ghost);
        for (g, &r) in g.chunks_exact(d).zip(&rows) {
            gx[r * d..(r + 1) * d].iter_mut().zip(g).for_each(|(a, g)| *a += g);
        }
        Ok(())
    });
    out.put_tape(tape)
}

/// Combine as dfdx ops (the reference): mask the gates of dropped tokens, broadcast them over
/// the features, gather each token's slot (slot 0 for a dropped one) and multiply.
pub fn combine_plain<D: Kernels, T: Tp<D>>(
    x: Act<D, T>,
    gate: Tensor<(usize,), f32, D, T>,
    slots: &[Option<usize>],
) -> Act<D, T> {
    let (n, d) = (slots.len(), x.shape().1);
    let dev = x.device().clone();
    let kept: Vec<f32> = slots.iter().map(|s| s.map_or(0.0, |_| 1.0)).collect();
    let rows: Vec<usize> = slots.iter().map(|s| s.unwrap_or(0)).collect();
    let gate = (gate * device_tensor(&dev, &kept, (n,))).broadcast_like::<_, Axis<1>>(&(n, d));
    x.gather(dev.indices(&rows)) * gate
}

/// `y[t] = gate[t] · x[slot[t]]`, zero for a dropped token, in one pass. With g = ∂L/∂y:
/// `∂x[slot[t]] += gate[t] · g[t]` and `∂gate[t] += g[t] · x[slot[t]]`, kept tokens only. It keeps
/// `x` and `gate` (shared, not copied) for the backward pass, where the plain path keeps the
/// gathered rows and the broadcast gate.
pub fn combine_fused<T: Tp<Cpu>>(
    x: Act<Cpu, T>,
    gate: Tensor<(usize,), f32, Cpu, T>,
    slots: &[Option<usize>],
) -> Act<Cpu, T> {
    let ((rows, d), n) = (*x.shape(), slots.len());
    assert_eq!(gate.shape().0, n, "combine: {n} tokens, {} gates", gate.shape().0);
    assert!(slots.iter().flatten().all(|&s| s < rows), "combine: a slot is outside the {rows} rows");
    let dev = x.device().clone();
    let (x, tx) = x.split_tape();
    let (gate, tg) = gate.split_tape();
    let mut tape = tx.merge(tg);
    let out = with_output(&dev, (n, d), |y| {
        let (xs, gs) = (data(&x), data(&gate));
        for ((y, slot), g) in y.chunks_exact_mut(d).zip(slots).zip(gs) {
            if let Some(s) = slot {
                y.iter_mut().zip(&xs[s * d..(s + 1) * d]).for_each(|(y, x)| *y = x * g);
            }
        }
    });
    let slots = slots.to_vec();
    let (x_ghost, gate_ghost, out_ghost) = (x.ghost(), gate.ghost(), out.ghost());
    tape.add_backward_op(move |grads| {
        let (xs, gs) = (data(&x), data(&gate));
        let mut dgate = vec![0f32; n];
        let (gx, g) = input_and_output_grads!(grads, &x_ghost, &out_ghost);
        for (t, (g, slot)) in g.chunks_exact(d).zip(&slots).enumerate() {
            if let Some(s) = slot {
                let (gx, x) = (&mut gx[s * d..(s + 1) * d], &xs[s * d..(s + 1) * d]);
                gx.iter_mut().zip(g).for_each(|(a, g)| *a += g * gs[t]);
                dgate[t] = g.iter().zip(x).map(|(g, x)| g * x).sum();
            }
        }
        grads.get_or_alloc_mut(&gate_ghost)?.iter_mut().zip(&dgate).for_each(|(a, d)| *a += d);
        Ok(())
    });
    out.put_tape(tape)
}

/// `x ⊙ c` as dfdx ops (the reference): `c` becomes a tensor, and the product's backward pass
/// computes a gradient for it too.
pub fn mul_constant_plain<S: Shape, D: Kernels, T: Tp<D>>(x: Tensor<S, f32, D, T>, c: &[f32]) -> Tensor<S, f32, D, T> {
    let c = device_tensor(x.device(), c, *x.shape());
    x * c
}

/// `x ⊙ c` for a constant `c`, in one pass each way: ∂x += g ⊙ c, no gradient for `c`.
pub fn mul_constant_fused<S: Shape, T: Tp<Cpu>>(x: Tensor<S, f32, Cpu, T>, c: &[f32]) -> Tensor<S, f32, Cpu, T> {
    let shape = *x.shape();
    assert_eq!(c.len(), shape.num_elements(), "mul_constant: the constant has {} values for {shape:?}", c.len());
    let dev = x.device().clone();
    let (x, mut tape) = x.split_tape();
    let out = with_overwritten_output(&dev, shape, |y| {
        y.iter_mut().zip(data(&x)).zip(c).for_each(|((y, x), c)| *y = x * c);
    });
    let c = c.to_vec();
    let (x_ghost, out_ghost) = (x.ghost(), out.ghost());
    tape.add_backward_op(move |grads| {
        let (gx, g) = input_and_output_grads!(grads, &x_ghost, &out_ghost);
        gx.iter_mut().zip(g.iter()).zip(&c).for_each(|((a, g), c)| *a += g * c);
        Ok(())
    });
    out.put_tape(tape)
}

/// `x + res` as dfdx ops (the reference): the residual connection around a sublayer.
pub fn residual_add_plain<D: Kernels, T: Tp<D>>(x: Act<D, T>, res: Act<D, NoneTape>) -> Act<D, T> {
    x + res
}

/// Elements per parallel chunk of an elementwise pass: large enough that a chunk outweighs its
/// scheduling.
pub(super) const ELEMENTWISE_CHUNK: usize = 1 << 15;

/// `f(&mut dst[i], a[i], b[i])` for every i, in chunks on the run's threads, compiled wide.
/// Elementwise, so every bit is the same on any number of threads.
fn par_zip2(dst: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(&mut f32, f32, f32) + Sync) {
    dst.par_chunks_mut(ELEMENTWISE_CHUNK).enumerate().for_each(|(i, dst)| {
        let at = i * ELEMENTWISE_CHUNK;
        wide!(|| dst.iter_mut().zip(&a[at..]).zip(&b[at..]).for_each(|((d, a), b)| f(d, *a, *b)));
    });
}

/// Writes `v(a[i], b[i])` into a gradient as dfdx's ops do (they zero-fill it and add): `0 + v`
/// where this op is its first writer, `+= v` otherwise — the same bits, a −0 included, without
/// the fill.
fn write_gradient(grad: &mut [f32], add: bool, a: &[f32], b: &[f32], v: impl Fn(f32, f32) -> f32 + Sync) {
    if add {
        par_zip2(grad, a, b, |d, a, b| *d += v(a, b));
    } else {
        par_zip2(grad, a, b, |d, a, b| *d = 0.0 + v(a, b));
    }
}

/// `x + res` in one pass, on the run's threads; ∂x = ∂res = g, each written in place as dfdx's
/// add writes `1 · g`: `0 + g` where this op is the gradient's first writer, `+= g` otherwise.
pub fn residual_add_fused<T: Tp<Cpu>>(x: Act<Cpu, T>, res: Act<Cpu, NoneTape>) -> Act<Cpu, T> {
    let shape = *x.shape();
    assert_eq!(shape, *res.shape(), "residual_add: x is {shape:?}, the residual {:?}", res.shape());
    let dev = x.device().clone();
    let (x, mut tape) = x.split_tape();
    let out = with_overwritten_output(&dev, shape, |y| par_zip2(y, data(&x), data(&res), |y, a, b| *y = a + b));
    let (x_ghost, res_ghost, out_ghost) = (x.ghost(), res.ghost(), out.ghost());
    tape.add_backward_op(move |grads| {
        for ghost in [&x_ghost, &res_ghost] {
            let (gi, add, g) = input_for_overwrite_and_output_grads!(grads, ghost, &out_ghost);
            write_gradient(gi, add, g, g, |g, _| g);
        }
        Ok(())
    });
    out.put_tape(tape)
}

/// ReLU as a dfdx op (the reference).
pub fn relu_plain<S: Shape, D: Kernels, T: Tp<D>>(x: Tensor<S, f32, D, T>) -> Tensor<S, f32, D, T> {
    x.relu()
}

/// `max(x, 0)` in one pass on the run's threads; ∂x = g where x > 0 (read off the output), else
/// 0, written as dfdx writes it (`0 + v` where this op is the first writer, `+= v` otherwise):
/// dfdx's bits without its zero fill.
pub fn relu_fused<S: Shape, T: Tp<Cpu>>(x: Tensor<S, f32, Cpu, T>) -> Tensor<S, f32, Cpu, T> {
    let dev = x.device().clone();
    let (x, mut tape) = x.split_tape();
    let out = with_overwritten_output(&dev, *x.shape(), |y| {
        let xs = data(&x);
        par_zip2(y, xs, xs, |y, x, _| *y = x.max(0.0))
    });
    // The backward pass reads the output (max(x, 0) > 0 exactly where x > 0, NaN included), which
    // the next layer keeps anyway, so the pre-activation's buffer is freed with the tape's hold.
    let (x_ghost, out_ghost, kept) = (x.ghost(), out.ghost(), out.clone());
    drop(x);
    tape.add_backward_op(move |grads| {
        let (gx, add, g) = input_for_overwrite_and_output_grads!(grads, &x_ghost, &out_ghost);
        // dfdx's `df(x) · g`, with df = 1 where x > 0, else 0
        write_gradient(gx, add, data(&kept), g, |y, g| if y > 0.0 { 1.0 } else { 0.0 } * g);
        Ok(())
    });
    out.put_tape(tape)
}
