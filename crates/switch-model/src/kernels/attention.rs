//! Attention: softmax(q·kᵀ + bias)·v per example and head, with T5's relative-position bias
//! looked up from its table. The plain path is dfdx ops; the fused one a kernel each way.
use super::rows::ELEMENTWISE_CHUNK;
use super::{
    data, gemm_into, gemm_strided, slots, softmax_backward, softmax_with_bias, to_overwrite, with_overwritten_output,
    Kernels, Operand,
};
use crate::tensor::{device_tensor, Act, Param, Tp};
use crate::wide;
use dfdx::prelude::*;
use rayon::prelude::*;

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
    let (qs, ks, vs) = (data(&q), data(&k), data(&v));
    let bias_values: Option<Vec<f32>> = bias.map(|b| bias_rows(b, heads));
    // Example b owns rows b·lq.. of q and out, b·lk.. of k and v, and its heads' slices of P:
    // examples run in parallel on the run's threads, heads one after another in each; every sum
    // keeps its order, so the result does not depend on the number of threads.
    let (q_rows, kv_rows, p_len) = (lq * hd, lk * hd, heads * lq * lk);
    // P comes unfilled from dfdx's buffer cache when it holds one (a new buffer is zeroed): the
    // scores' product overwrites every element.
    let mut probs = dev.try_tensor_for_overwrite((batch * p_len,)).expect("out of memory for attention's softmax");
    let p_all = to_overwrite(probs.host_slice_mut());
    let out = with_overwritten_output(&dev, (nq, hd), |y| {
        y.par_chunks_mut(q_rows).zip(p_all.par_chunks_mut(p_len)).enumerate().for_each(|(b, (y, probs))| {
            let (q, k, v) = (&qs[b * q_rows..], &ks[b * kv_rows..], &vs[b * kv_rows..]);
            for (h, p) in probs.chunks_exact_mut(lq * lk).enumerate() {
                gemm_into(p, (lq, lk, dk), (&q[h * dk..], hd, 1), (&k[h * dk..], 1, hd), false);
                softmax_with_bias(p, bias_values.as_ref().map(|bv| &bv[h * lq * lk..]), lk);
                product((&mut y[h * dk..], hd), (lq, dk, lk), (p, lk, 1), (&v[h * dk..], hd), false);
            }
        })
    });
    let (q_ghost, k_ghost, v_ghost, out_ghost) = (q.ghost(), k.ghost(), v.ghost(), out.ghost());
    let table = bias.map(|b| (b.table.ghost(), b.buckets.clone()));
    tape.add_backward_op(move |grads| {
        let (qs, ks, vs) = (data(&q), data(&k), data(&v));
        let mut probs = probs;
        let probs = probs.host_slice_mut();
        // ∂V and ∂S (into P's buffer, which each head's ∂S reads last), then ∂Q and ∂K, each into
        // its gradient: overwritten where this is its first writer (each example and head owns
        // its block), else added to.
        {
            let (gv, add, g) = input_for_overwrite_and_output_grads!(grads, &v_ghost, &out_ghost);
            gv.par_chunks_mut(kv_rows).zip(probs.par_chunks_mut(p_len)).enumerate().for_each(|(b, (dv, probs))| {
                let (v, g) = (&vs[b * kv_rows..], &g[b * q_rows..]);
                let mut ds = vec![0f32; lq * lk];
                for (h, p) in probs.chunks_exact_mut(lq * lk).enumerate() {
                    let o = h * dk;
                    product((&mut dv[o..], hd), (lk, dk, lq), (&*p, 1, lk), (&g[o..], hd), add);
                    gemm_into(&mut ds, (lq, lk, dk), (&g[o..], hd, 1), (&v[o..], 1, hd), false);
                    softmax_backward(&mut ds, p, lk);
                    p.copy_from_slice(&ds);
                }
            });
        }
        let ds_all = &*probs; // ∂Q = ∂S·K, ∂K = ∂Sᵀ·Q (∂S read transposed)
        let products =
            [(&q_ghost, q_rows, ks, kv_rows, (lq, lk), (lk, 1)), (&k_ghost, kv_rows, qs, q_rows, (lk, lq), (1, lk))];
        for (ghost, rows, other, other_rows, (l_out, l_in), ds_strides) in products {
            let (gx, add, _) = input_for_overwrite_and_output_grads!(grads, ghost, &out_ghost);
            gx.par_chunks_mut(rows).enumerate().for_each(|(b, dx)| {
                let other = &other[b * other_rows..];
                for (h, ds) in ds_all[b * p_len..(b + 1) * p_len].chunks_exact(lq * lk).enumerate() {
                    let (o, (rs, cs)) = (h * dk, ds_strides);
                    product((&mut dx[o..], hd), (l_out, dk, l_in), (ds, rs, cs), (&other[o..], hd), add);
                }
            });
        }
        if let Some((table_ghost, buckets)) = &table {
            add_bias_grad(grads.get_or_alloc_mut(table_ghost)?, buckets, ds_all, p_len, heads);
        }
        Ok(())
    });
    out.put_tape(tape)
}

/// `dst (rows × cols, rows `dst.1` apart) [+]= a · b`, `b`'s rows `b.1` apart: at one vector a row
/// (`tiny`'s heads of 16) the engine's own loop, where gemm packs and tiles for larger products;
/// at heads of 64 gemm is the faster.
fn product(
    dst: (&mut [f32], usize),
    (rows, cols, inner): (usize, usize, usize),
    a: Operand,
    b: (&[f32], usize),
    add: bool,
) {
    if own_loop_keeps_gemms_bits(rows, cols, inner) {
        slots::broadcast_product_strided(dst, (rows, cols, inner), a, b, add)
    } else {
        gemm_strided(dst, (rows, cols, inner), a, (b.0, b.1, 1), add)
    }
}

/// Whether the own loop runs here (AVX-512F, one vector a row) on a product gemm 0.19 would run
/// on its packed path: one FMA chain per element over the inner dimension in order, then the add,
/// as the own loop. Not its dot-product path (never here: `b`'s rows are apart), its
/// matrix–vector paths (one row), its outer-product path (inner ≤ 2), nor an inner dimension it
/// splits into blocks (never below 512).
fn own_loop_keeps_gemms_bits(rows: usize, cols: usize, inner: usize) -> bool {
    slots::available() && cols == slots::LANES && rows >= 2 && (3..=512).contains(&inner)
}

/// The bias (with the mask) of every head, query and key: `[heads, lq·lk]`, row-major.
fn bias_rows(b: &PositionBias<Cpu>, heads: usize) -> Vec<f32> {
    let table = data(&b.table);
    (0..heads)
        .flat_map(|h| {
            b.buckets.iter().enumerate().map(|(i, &bk)| table[bk * heads + h] + b.mask(i)).collect::<Vec<_>>()
        })
        .collect()
}

/// Adds Σ over examples (in order) of each example's ∂S (`[heads, lq·lk]` each, `p_len` long,
/// one after another in `dbias`) to the bias table's gradient `gt`, bucket by bucket.
fn add_bias_grad(gt: &mut [f32], buckets: &[usize], dbias: &[f32], p_len: usize, heads: usize) {
    // Chunks of the sum on the run's threads, each element summed over the examples in order.
    let mut summed = vec![0f32; p_len];
    summed.par_chunks_mut(ELEMENTWISE_CHUNK).enumerate().for_each(|(i, summed)| {
        let at = i * ELEMENTWISE_CHUNK;
        wide!(|| {
            for example in dbias.chunks_exact(p_len) {
                summed.iter_mut().zip(&example[at..]).for_each(|(a, d)| *a += d);
            }
        })
    });
    for (h, dbias) in summed.chunks_exact(buckets.len()).enumerate() {
        buckets.iter().zip(dbias).for_each(|(&bk, d)| gt[bk * heads + h] += d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Every product attention computes, with heads' column blocks as operands, against gemm
    /// itself: the own loop must give gemm's bits where it stands in for it.
    #[test]
    fn attention_products_keep_gemms_bits() {
        if !slots::available() {
            eprintln!("no AVX-512F here: attention runs gemm alone, so this compares gemm with itself");
        }
        let mut rng = StdRng::seed_from_u64(9);
        let mut random = |n: usize| (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect::<Vec<_>>();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        // (lq, lk, dk): tiny's encoder, decoder and cross-attention; more than 64 rows (gemm's
        // other blocking); the smallest own-loop product (2 rows, inner 3); gemm's outer-product
        // path (inner 2), matrix–vector paths (one query or key) and inner blocks (600 = 2 × 300);
        // odd lengths; heads of 32 and 64 (gemm)
        let shapes = [(64, 64, 16), (14, 14, 16), (14, 64, 16), (64, 14, 16), (128, 128, 16), (2, 3, 16), (3, 2, 16)];
        let edges = [(2, 2, 16), (1, 32, 16), (32, 1, 16), (4, 600, 16), (600, 4, 16)];
        for (lq, lk, dk) in shapes.into_iter().chain(edges).chain([(20, 48, 16), (33, 32, 32), (128, 128, 64)]) {
            let (heads, h) = (3, 1);
            let hd = heads * dk;
            let (k, g, p) = (random(lk * hd), random(lq * hd), random(lq * lk));
            let (start_q, start_k) = (random(lq * hd), random(lk * hd));
            for add in [false, true] {
                // P·v (rows of the output `hd` apart), Pᵀ·g (P read transposed)
                let (mut got, mut want) = (start_q.clone(), start_q.clone());
                product((&mut got[h * dk..], hd), (lq, dk, lk), (&p, lk, 1), (&k[h * dk..], hd), add);
                gemm_strided((&mut want[h * dk..], hd), (lq, dk, lk), (&p, lk, 1), (&k[h * dk..], hd, 1), add);
                assert_eq!(bits(&got), bits(&want), "P·v at {lq}×{lk}×{dk}, add {add}");
                let (mut got, mut want) = (start_k.clone(), start_k.clone());
                product((&mut got[h * dk..], hd), (lk, dk, lq), (&p, 1, lk), (&g[h * dk..], hd), add);
                gemm_strided((&mut want[h * dk..], hd), (lk, dk, lq), (&p, 1, lk), (&g[h * dk..], hd, 1), add);
                assert_eq!(bits(&got), bits(&want), "Pᵀ·g at {lq}×{lk}×{dk}, add {add}");
            }
        }
    }

    #[test]
    fn the_bias_gradient_keeps_the_serial_sum_bits_over_several_chunks() {
        let mut rng = StdRng::seed_from_u64(5);
        let (heads, pairs, examples) = (3, 20_000, 4); // p_len 60000: two chunks, the second ragged
        let p_len = heads * pairs;
        let buckets: Vec<usize> = (0..pairs).map(|_| rng.gen_range(0..32)).collect();
        let dbias: Vec<f32> = (0..examples * p_len).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let start: Vec<f32> = (0..32 * heads).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut want = start.clone();
        let mut summed = vec![0f32; p_len];
        for example in dbias.chunks_exact(p_len) {
            summed.iter_mut().zip(example).for_each(|(a, d)| *a += d);
        }
        for (h, s) in summed.chunks_exact(pairs).enumerate() {
            buckets.iter().zip(s).for_each(|(&bk, d)| want[bk * heads + h] += d);
        }
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut got = start.clone();
            pool.install(|| add_bias_grad(&mut got, &buckets, &dbias, p_len, heads));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "on {threads} threads");
        }
    }
}
