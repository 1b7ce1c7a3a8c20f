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
use crate::nn::{device_tensor, Act, Param, Tp};
use dfdx::prelude::*;
use rayon::prelude::*;

/// 3-D activations `[experts, tokens, features]` carrying tape `T`.
pub type Act3<D, T> = Tensor<(usize, usize, usize), f32, D, T>;

/// How a flat parameter holds the matrices of a product `x · W`: `experts` matrices of `k × m`,
/// stored one after another row-major (`[E, k, m]`), or, when `transposed`, stored `[E, m, k]`
/// and used transposed (the tied output embedding, `[vocab, d_model]`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stacked {
    pub experts: usize,
    pub k: usize,
    pub m: usize,
    pub transposed: bool,
}

impl Stacked {
    /// One `k × m` matrix stored `[k, m]` (a linear layer's weight).
    pub fn matrix(k: usize, m: usize) -> Self {
        Self { experts: 1, k, m, transposed: false }
    }
    /// (row stride, column stride) of one `k × m` matrix inside the flat parameter.
    fn strides(&self) -> (usize, usize) {
        if self.transposed {
            (1, self.k)
        } else {
            (self.m, 1)
        }
    }
}

/// ε inside T5's RMSNorm square root.
pub const RMS_EPS: f32 = 1e-6;

/// The engine's kernels for device `Self`. The defaults are the plain dfdx compositions.
pub trait Kernels: Device<f32> {
    /// An index tensor holding `values`. On the CPU its buffer comes from the device's allocator,
    /// for the reason given at [`crate::nn::device_tensor`].
    fn indices(&self, values: &[usize]) -> Tensor<(usize,), usize, Self> {
        self.tensor_from_vec(values.to_vec(), (values.len(),))
    }
    /// `x · w / √(mean(x²) + ε)` over the last axis. `x`: `[tokens, d]`, `w`: `[d]`.
    fn rms_norm<T: Tp<Self>>(x: Act<Self, T>, w: &Param<Self>) -> Act<Self, T> {
        rms_norm_plain(x, w)
    }
    /// `x · W` for each of `w`'s stacked matrices: `x` `[E, c, k]` → `[E, c, m]`.
    fn param_matmul<T: Tp<Self>>(x: Act3<Self, T>, w: &Param<Self>, layout: Stacked) -> Act3<Self, T> {
        param_matmul_plain(x, w, layout)
    }
    /// Mean over tokens of −log softmax(logits)[target]: `logits` `[tokens, vocab]`.
    fn cross_entropy<T: Tp<Self>>(logits: Act<Self, T>, targets: &[usize]) -> Tensor<(), f32, Self, T> {
        cross_entropy_plain(logits, targets)
    }
    /// softmax(q·kᵀ + bias)·v for each example and head, without 1/√d_kv (T5 folds it into the
    /// query's init). `q`: `[batch·Lq, heads·d_kv]`, `k`, `v`: `[batch·Lk, heads·d_kv]`, heads
    /// side by side as the projections give them → `[batch·Lq, heads·d_kv]`.
    fn attention<T: Tp<Self>>(
        q: Act<Self, T>,
        k: Act<Self, T>,
        v: Act<Self, T>,
        bias: Option<&PositionBias<Self>>,
        batch: usize,
        heads: usize,
    ) -> Act<Self, T> {
        attention_plain(q, k, v, bias, batch, heads)
    }
}

impl Kernels for Cpu {
    fn indices(&self, values: &[usize]) -> Tensor<(usize,), usize, Self> {
        let mut t = self.zeros_like(&(values.len(),));
        t.copy_from(values);
        t
    }
    fn rms_norm<T: Tp<Self>>(x: Act<Self, T>, w: &Param<Self>) -> Act<Self, T> {
        if plain_kernels() {
            rms_norm_plain(x, w)
        } else {
            rms_norm_fused(x, w)
        }
    }
    fn param_matmul<T: Tp<Self>>(x: Act3<Self, T>, w: &Param<Self>, layout: Stacked) -> Act3<Self, T> {
        if plain_kernels() {
            param_matmul_plain(x, w, layout)
        } else {
            param_matmul_fused(x, w, layout)
        }
    }
    fn cross_entropy<T: Tp<Self>>(logits: Act<Self, T>, targets: &[usize]) -> Tensor<(), f32, Self, T> {
        if plain_kernels() {
            cross_entropy_plain(logits, targets)
        } else {
            cross_entropy_fused(logits, targets)
        }
    }
    fn attention<T: Tp<Self>>(
        q: Act<Self, T>,
        k: Act<Self, T>,
        v: Act<Self, T>,
        bias: Option<&PositionBias<Self>>,
        batch: usize,
        heads: usize,
    ) -> Act<Self, T> {
        if plain_kernels() {
            attention_plain(q, k, v, bias, batch, heads)
        } else {
            attention_fused(q, k, v, bias, batch, heads)
        }
    }
}

static PLAIN: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(UNSET);
const UNSET: u8 = 2;

/// `SWITCHLAB_PLAIN_KERNELS=1`: the CPU runs the plain dfdx path (read once per process, unless
/// [`set_plain_kernels`] chose first).
pub fn plain_kernels() -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    match PLAIN.load(Relaxed) {
        UNSET => {
            let plain = std::env::var("SWITCHLAB_PLAIN_KERNELS").is_ok_and(|v| v == "1");
            PLAIN.store(plain as u8, Relaxed);
            plain
        }
        v => v == 1,
    }
}

/// Chooses the plain (`true`) or fused kernels for the rest of this process, whatever the
/// environment says: for a test that compares whole models both ways.
pub fn set_plain_kernels(plain: bool) {
    PLAIN.store(plain as u8, std::sync::atomic::Ordering::Relaxed);
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
fn with_output<S: Shape>(dev: &Cpu, shape: S, fill: impl FnOnce(&mut [f32])) -> Tensor<S, f32, Cpu> {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.clear();
        scratch.resize(shape.num_elements(), 0.0);
        fill(scratch);
        device_tensor(dev, scratch, shape)
    })
}

/// RMSNorm in one pass each way. With r = 1/√(mean(x²) + ε) per row and g = ∂L/∂y:
/// ∂L/∂x = r·(g⊙w) − x·r³·mean(g⊙w⊙x), ∂L/∂w = Σ_rows g⊙x·r.
pub fn rms_norm_fused<T: Tp<Cpu>>(x: Act<Cpu, T>, w: &Param<Cpu>) -> Act<Cpu, T> {
    let (n, d) = *x.shape();
    let dev = x.device().clone();
    let (x, mut tape) = x.split_tape();
    let (mut xs, mut ws) = (Vec::new(), Vec::new());
    host(&x, &mut xs);
    host(w, &mut ws);
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

/// `x · W` as dfdx ops (the reference): a batched matmul with the reshaped (or transposed) weight.
pub fn param_matmul_plain<D: Device<f32>, T: Tp<D>>(x: Act3<D, T>, w: &Param<D>, layout: Stacked) -> Act3<D, T> {
    let Stacked { experts: e, k, m, transposed } = layout;
    if transposed {
        x.matmul(w.clone().reshape_like(&(e, m, k)).permute::<_, Axes3<0, 2, 1>>())
    } else {
        x.matmul(w.clone().reshape_like(&(e, k, m)))
    }
}

/// A row-major-or-strided matrix operand: (data, row stride, column stride).
type Operand<'a> = (&'a [f32], usize, usize);

/// `dst (rows × cols, row-major) [+]= lhs (rows × inner) · rhs (inner × cols)` on this thread,
/// with gemm 0.19 (its fastest kernel for this CPU, chosen at run time).
fn gemm_into(dst: &mut [f32], shape: (usize, usize, usize), lhs: Operand, rhs: Operand, accumulate: bool) {
    gemm_strided((dst, shape.1), shape, lhs, rhs, accumulate)
}

/// [`gemm_into`] into a destination whose rows are `dst_rs` apart (a column block of a wider matrix).
fn gemm_strided(
    (dst, dst_rs): (&mut [f32], usize),
    (rows, cols, inner): (usize, usize, usize),
    lhs: Operand,
    rhs: Operand,
    accumulate: bool,
) {
    assert!(dst.len() >= (rows - 1) * dst_rs + cols);
    assert!(lhs.0.len() >= (rows - 1) * lhs.1 + (inner - 1) * lhs.2 + 1);
    assert!(rhs.0.len() >= (inner - 1) * rhs.1 + (cols - 1) * rhs.2 + 1);
    // SAFETY: the asserts above keep every index gemm reads or writes inside the slices; `dst`
    // is borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            rows,
            cols,
            inner,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0.as_ptr(),
            rhs.2 as isize,
            rhs.1 as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Fills `dst`, `experts` row-major `rows × cols` products one after another, block by block:
/// `f(expert, first row, block)` computes a block of one expert's rows on one thread. With
/// several threads the blocks (a whole expert each, or a share of one expert's rows when there
/// are fewer experts than threads) run in parallel: gemm's own threading splits these skinny
/// products less well.
fn by_blocks(
    dst: &mut [f32],
    experts: usize,
    (rows, cols): (usize, usize),
    f: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    assert_eq!(dst.len(), experts * rows * cols);
    let threads = rayon::current_num_threads();
    let block_rows = rows.div_ceil(threads.div_ceil(experts)).max(1);
    let per_expert = |(expert, d): (usize, &mut [f32])| {
        d.chunks_mut(block_rows * cols).enumerate().for_each(|(b, block)| f(expert, b * block_rows, block))
    };
    if threads == 1 {
        dst.chunks_mut(rows * cols).enumerate().for_each(per_expert);
    } else {
        dst.par_chunks_mut(rows * cols).enumerate().for_each(|(expert, d)| {
            d.par_chunks_mut(block_rows * cols).enumerate().for_each(|(b, block)| f(expert, b * block_rows, block))
        });
    }
}

thread_local! {
    /// Host copies of a kernel's operands, reused call after call: dfdx 0.13 has no public view of
    /// a CPU tensor's data, and `as_vec` copies element by element into a fresh `Vec`.
    static OPERANDS: std::cell::RefCell<[Vec<f32>; 3]> = const { std::cell::RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
}

/// Copies `t`'s data into `buf` in one `memcpy`. `t` must have standard strides, as every output
/// of a dfdx op or kernel has (a broadcast tensor panics here; nothing passes a permuted one).
fn host<S: Shape, T>(t: &Tensor<S, f32, Cpu, T>, buf: &mut Vec<f32>) {
    buf.resize(t.shape().num_elements(), 0.0);
    t.copy_into(buf);
}

/// `x · W` with gemm 0.19, each way in one call per expert. With g = ∂L/∂y:
/// ∂L/∂x = g · Wᵀ and ∂L/∂W = xᵀ · g, accumulated into the existing gradients.
pub fn param_matmul_fused<T: Tp<Cpu>>(x: Act3<Cpu, T>, w: &Param<Cpu>, layout: Stacked) -> Act3<Cpu, T> {
    let (e, c, k) = *x.shape();
    let m = layout.m;
    assert_eq!((e, k), (layout.experts, layout.k), "param_matmul: x is [{e}, {c}, {k}], the weight {layout:?}");
    assert_eq!(
        w.shape().0,
        e * k * m,
        "param_matmul: the weight has {} entries, {layout:?} needs {}",
        w.shape().0,
        e * k * m
    );
    let dev = x.device().clone();
    let (x, mut tape) = x.split_tape();
    let (w_rs, w_cs) = layout.strides();
    let out = OPERANDS.with_borrow_mut(|[xs, ws, _]| {
        host(&x, xs);
        host(w, ws);
        with_output(&dev, (e, c, m), |y| {
            by_blocks(y, e, (c, m), |i, r0, y| {
                let (xi, wi) = (&xs[(i * c + r0) * k..], &ws[i * k * m..]);
                gemm_into(y, (y.len() / m, m, k), (xi, k, 1), (wi, w_rs, w_cs), false)
            })
        })
    });
    let (x_ghost, w_ghost, out_ghost) = (x.ghost(), w.ghost(), out.ghost());
    let w = w.clone(); // shares the weights' buffer until the backward pass has run
    tape.add_backward_op(move |grads| {
        OPERANDS.with_borrow_mut(|[xs, ws, g]| {
            host(&x, xs);
            host(&w, ws);
            g.clear();
            g.extend_from_slice(grads.get_or_alloc_mut(&out_ghost)?);
            // ∂x (c × k) += g (c × m) · Wᵀ (m × k): Wᵀ swaps W's strides.
            by_blocks(grads.get_or_alloc_mut(&x_ghost)?, e, (c, k), |i, r0, gx| {
                let (gi, wi) = (&g[(i * c + r0) * m..], &ws[i * k * m..]);
                gemm_into(gx, (gx.len() / k, k, m), (gi, m, 1), (wi, w_cs, w_rs), true)
            });
            // ∂W (k × m) += xᵀ (k × c) · g (c × m); stored transposed (m × k): += gᵀ · x.
            let (rows, cols) = if layout.transposed { (m, k) } else { (k, m) };
            by_blocks(grads.get_or_alloc_mut(&w_ghost)?, e, (rows, cols), |i, r0, gw| {
                let (xi, gi) = (&xs[i * c * k..], &g[i * c * m..]);
                let block = (gw.len() / cols, cols, c);
                if layout.transposed {
                    gemm_into(gw, block, (&gi[r0..], 1, m), (xi, k, 1), true)
                } else {
                    gemm_into(gw, block, (&xi[r0..], 1, k), (gi, m, 1), true)
                }
            });
            Ok(())
        })
    });
    out.put_tape(tape)
}

/// Cross-entropy as dfdx ops (the reference): log-softmax, select the targets, mean, negate.
pub fn cross_entropy_plain<D: Kernels, T: Tp<D>>(logits: Act<D, T>, targets: &[usize]) -> Tensor<(), f32, D, T> {
    let targets = logits.device().indices(targets);
    -logits.log_softmax::<Axis<1>>().select(targets).mean()
}

/// Cross-entropy in one pass each way, keeping one `[tokens, vocab]` buffer (the softmax) for
/// the backward pass: ∂L/∂logits = (softmax − one_hot(target)) / tokens.
pub fn cross_entropy_fused<T: Tp<Cpu>>(logits: Act<Cpu, T>, targets: &[usize]) -> Tensor<(), f32, Cpu, T> {
    let (n, v) = *logits.shape();
    assert_eq!(targets.len(), n, "cross_entropy: {n} rows of logits, {} targets", targets.len());
    assert!(targets.iter().all(|&t| t < v), "cross_entropy: a target is outside the vocabulary of {v}");
    let dev = logits.device().clone();
    let (logits, mut tape) = logits.split_tape();
    // Each row becomes its softmax in place; its loss is logsumexp − the target's logit.
    let mut probs = Vec::new();
    host(&logits, &mut probs);
    let row_loss = |(row, &t): (&mut [f32], &usize)| {
        let target = row[t];
        let (max, sum) = softmax_row(row);
        (max + sum.ln() - target) as f64
    };
    let losses: Vec<f64> = if rayon::current_num_threads() > 1 {
        probs.par_chunks_mut(v).zip(targets.par_iter()).map(row_loss).collect()
    } else {
        probs.chunks_mut(v).zip(targets.iter()).map(row_loss).collect()
    };
    let mean = (losses.iter().sum::<f64>() / n as f64) as f32;
    let out = with_output(&dev, (), |y| y[0] = mean);
    let targets = targets.to_vec();
    let (logits_ghost, out_ghost) = (logits.ghost(), out.ghost());
    tape.add_backward_op(move |grads| {
        let scale = grads.get_or_alloc_mut(&out_ghost)?[0] / n as f32;
        let g = grads.get_or_alloc_mut(&logits_ghost)?;
        assert_eq!(g.len(), n * v, "cross_entropy_fused needs contiguous logits");
        for ((g, p), &t) in g.chunks_exact_mut(v).zip(probs.chunks_exact(v)).zip(&targets) {
            g.iter_mut().zip(p).for_each(|(g, p)| *g += scale * p);
            g[t] -= scale;
        }
        Ok(())
    });
    out.put_tape(tape)
}

/// The relative-position bias of one stack, shared by its layers as in T5: the bucket of each
/// (query, key) pair, and in the decoder the causal mask (−1e9 above the diagonal). The bias of
/// head h for a pair is `table[bucket · heads + h]`.
pub struct PositionBias<D: Device<f32>> {
    /// `[num_buckets, heads]`, the stack's parameter.
    pub table: Param<D>,
    /// `[Lq, Lk]`: each pair's bucket.
    pub buckets: Vec<usize>,
    pub len_q: usize,
    pub len_k: usize,
    pub causal: bool,
}

impl<D: Kernels> PositionBias<D> {
    /// The mask's value for pair `i` of the `[Lq, Lk]` grid.
    fn mask(&self, i: usize) -> f32 {
        if self.causal && i % self.len_k > i / self.len_k {
            -1e9
        } else {
            0.0
        }
    }

    /// `[heads, Lq, Lk]` as dfdx ops: gather the buckets, move heads first, add the mask.
    fn plain<T: Tp<D>>(&self, heads: usize) -> Tensor<(usize, usize, usize), f32, D, T> {
        let dev = self.table.device();
        let (lq, lk) = (self.len_q, self.len_k);
        let idx = dev.indices(&self.buckets);
        let rows = self.table.clone().reshape_like(&(self.table.shape().0 / heads, heads)).retaped::<T>().gather(idx);
        let bias = rows.reshape_like(&(lq, lk, heads)).permute::<_, Axes3<2, 0, 1>>();
        let mask: Vec<f32> = (0..lq * lk).map(|i| self.mask(i)).collect();
        bias + device_tensor(dev, &mask, (lq, lk)).broadcast_like::<_, Axis<0>>(&(heads, lq, lk))
    }
}

/// Attention as dfdx ops (the reference): split the heads out with permutes, batched matmuls,
/// the bias broadcast over the batch, softmax, and the heads put back side by side.
pub fn attention_plain<D: Kernels, T: Tp<D>>(
    q: Act<D, T>,
    k: Act<D, T>,
    v: Act<D, T>,
    bias: Option<&PositionBias<D>>,
    batch: usize,
    heads: usize,
) -> Act<D, T> {
    let (lq, lk, dk) = (q.shape().0 / batch, k.shape().0 / batch, q.shape().1 / heads);
    let q = q.reshape_like(&(batch, lq, heads, dk)).permute::<_, Axes4<0, 2, 1, 3>>();
    let k = k.reshape_like(&(batch, lk, heads, dk)).permute::<_, Axes4<0, 2, 3, 1>>();
    let v = v.reshape_like(&(batch, lk, heads, dk)).permute::<_, Axes4<0, 2, 1, 3>>();
    let scores = q.matmul(k);
    let scores = match bias {
        Some(b) => scores + b.plain::<T>(heads).broadcast_like::<_, Axis<0>>(&(batch, heads, lq, lk)),
        None => scores,
    };
    scores.softmax::<Axis<3>>().matmul(v).permute::<_, Axes4<0, 2, 1, 3>>().reshape_like(&(batch * lq, heads * dk))
}

/// Softmax of `row`, in place; returns its max and Σ exp(x − max) (logsumexp = max + ln sum).
fn softmax_row(row: &mut [f32]) -> (f32, f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0.0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    row.iter_mut().for_each(|v| *v /= sum);
    (max, sum)
}

/// Attention in one op each way, per example and head on the heads' column blocks (no permute
/// copies), with the bias looked up from the table (no gather, no broadcast over the batch). It
/// keeps the softmax P for the backward pass. With G = ∂L/∂out:
/// ∂V = Pᵀ·G, ∂P = G·Vᵀ, ∂S = P ⊙ (∂P − rowsum(∂P ⊙ P)), ∂Q = ∂S·K, ∂K = ∂Sᵀ·Q, ∂bias = Σ_batch ∂S.
pub fn attention_fused<T: Tp<Cpu>>(
    q: Act<Cpu, T>,
    k: Act<Cpu, T>,
    v: Act<Cpu, T>,
    bias: Option<&PositionBias<Cpu>>,
    batch: usize,
    heads: usize,
) -> Act<Cpu, T> {
    let ((nq, hd), nk) = (*q.shape(), k.shape().0);
    let (lq, lk, dk) = (nq / batch, nk / batch, hd / heads);
    assert_eq!((nq % batch, nk % batch, hd % heads), (0, 0, 0), "attention: shapes do not split into batch × heads");
    let dev = q.device().clone();
    let (q, tq) = q.split_tape();
    let (k, tk) = k.split_tape();
    let (v, tv) = v.split_tape();
    let mut tape = tq.merge(tk).merge(tv);
    let (mut qs, mut ks, mut vs, mut table) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    host(&q, &mut qs);
    host(&k, &mut ks);
    host(&v, &mut vs);
    let bias_values: Option<Vec<f32>> = bias.map(|b| {
        host(&b.table, &mut table);
        (0..heads)
            .flat_map(|h| {
                b.buckets.iter().enumerate().map(|(i, &bk)| table[bk * heads + h] + b.mask(i)).collect::<Vec<_>>()
            })
            .collect()
    });
    // Per (example, head): the block's offset in q / out and in k, v, and its slice of P.
    let block = move |b: usize, h: usize| (b * lq * hd + h * dk, b * lk * hd + h * dk, (b * heads + h) * lq * lk);
    let mut probs = vec![0f32; batch * heads * lq * lk];
    let out = with_output(&dev, (nq, hd), |y| {
        for (b, h) in (0..batch).flat_map(|b| (0..heads).map(move |h| (b, h))) {
            let (qo, ko, po) = block(b, h);
            let p = &mut probs[po..po + lq * lk];
            gemm_into(p, (lq, lk, dk), (&qs[qo..], hd, 1), (&ks[ko..], 1, hd), false);
            if let Some(bv) = &bias_values {
                p.iter_mut().zip(&bv[h * lq * lk..]).for_each(|(s, b)| *s += b);
            }
            p.chunks_exact_mut(lk).for_each(|row| {
                softmax_row(row);
            });
            gemm_strided((&mut y[qo..], hd), (lq, dk, lk), (p, lk, 1), (&vs[ko..], hd, 1), false);
        }
    });
    let (q_ghost, k_ghost, v_ghost, out_ghost) = (q.ghost(), k.ghost(), v.ghost(), out.ghost());
    let table = bias.map(|b| (b.table.ghost(), b.buckets.clone()));
    tape.add_backward_op(move |grads| {
        let g = grads.get_or_alloc_mut(&out_ghost)?.to_vec();
        let (mut dq, mut dkey, mut dv) = (vec![0f32; nq * hd], vec![0f32; nk * hd], vec![0f32; nk * hd]);
        let (mut ds, mut dbias) = (vec![0f32; lq * lk], vec![0f32; heads * lq * lk]);
        for (b, h) in (0..batch).flat_map(|b| (0..heads).map(move |h| (b, h))) {
            let (qo, ko, po) = block(b, h);
            let p = &probs[po..po + lq * lk];
            gemm_strided((&mut dv[ko..], hd), (lk, dk, lq), (p, 1, lk), (&g[qo..], hd, 1), true);
            gemm_into(&mut ds, (lq, lk, dk), (&g[qo..], hd, 1), (&vs[ko..], 1, hd), false);
            for (d, p) in ds.chunks_exact_mut(lk).zip(p.chunks_exact(lk)) {
                let dot: f32 = d.iter().zip(p).map(|(d, p)| d * p).sum();
                d.iter_mut().zip(p).for_each(|(d, p)| *d = p * (*d - dot));
            }
            dbias[h * lq * lk..(h + 1) * lq * lk].iter_mut().zip(&ds).for_each(|(a, d)| *a += d);
            gemm_strided((&mut dq[qo..], hd), (lq, dk, lk), (&ds, lk, 1), (&ks[ko..], hd, 1), true);
            gemm_strided((&mut dkey[ko..], hd), (lk, dk, lq), (&ds, 1, lk), (&qs[qo..], hd, 1), true);
        }
        for (ghost, d) in [(&q_ghost, dq), (&k_ghost, dkey), (&v_ghost, dv)] {
            grads.get_or_alloc_mut(ghost)?.iter_mut().zip(&d).for_each(|(a, d)| *a += d);
        }
        if let Some((table_ghost, buckets)) = &table {
            let gt = grads.get_or_alloc_mut(table_ghost)?;
            for (h, dbias) in dbias.chunks_exact(lq * lk).enumerate() {
                buckets.iter().zip(dbias).for_each(|(&bk, d)| gt[bk * heads + h] += d);
            }
        }
        Ok(())
    });
    out.put_tape(tape)
}
