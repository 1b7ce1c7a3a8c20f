//! The experts' products on their capacity slots, by the engine's own AVX-512 loops
//! ([`KernelMode::FusedSlots`]). At 64–128 experts each expert holds 5–40 slots, and gemm's
//! packing and partial tiles cost more than its products: its ∂x ran at 38 GFLOP/s where the
//! machine's f32 FMA peak is ~190 (1 thread, 20 slots × 64 × 256). These loops read both operands
//! in place, and every output element is one chain of FMAs over the inner dimension in order, so
//! a row's bits do not depend on how many rows are computed beside it: the products can stop at
//! each expert's last filled slot.
//!
//! - [`broadcast_product`]: `dst = a · b`, `b` row-major: each `a` element broadcast times rows of
//!   `b` (∂W = xᵀ · g). Overwriting rows of 128 columns or more, it writes them with streaming
//!   stores (a ∂W is read again only after the whole backward pass).
//! - [`dot_product`]: `dst = a · bᵀ`, both row-major: dot products of rows (∂x = g · Wᵀ).
//!
//! Without AVX-512F (their plain loops there are for tests, not speed), or where a width is not a
//! multiple of 16, the caller uses gemm.
//!
//! ```
//! use switch_model::kernels::slots;
//! // [1 2] · [[1, …, 1], [2, …, 2]] (16 columns) = [5, …, 5]
//! let (a, b) = (vec![1.0f32, 2.0], [vec![1.0f32; 16], vec![2.0; 16]].concat());
//! let mut dst = vec![0.0f32; 16];
//! slots::broadcast_product(&mut dst, (1, 16, 2), (&a, 2, 1), &b, false);
//! assert_eq!(dst, vec![5.0; 16]);
//! // [1 2 0 … 0] · [1 2 0 … 0]ᵀ as a dot product of rows (inner 16)
//! let row = [vec![1.0f32, 2.0], vec![0.0; 14]].concat();
//! slots::dot_product(&mut dst[..1], (1, 1, 16), &row, &row, false);
//! assert_eq!(dst[0], 5.0);
//! ```
#[cfg(doc)]
use super::KernelMode;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Whether this CPU runs these loops (AVX-512F, detected once).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Lanes of one AVX-512 f32 vector: widths these loops take are multiples of it.
pub const LANES: usize = 16;

/// Σ n·stride over `terms`, saturating: a length can never reach `usize::MAX`, so a shape whose
/// products overflow fails the asserts instead of wrapping past them.
fn last_index(terms: &[(usize, usize)]) -> usize {
    terms.iter().fold(0usize, |sum, &(n, stride)| sum.saturating_add(n.saturating_mul(stride)))
}

/// Whether a slice of `len` holds Σ rows·cols elements (saturating, as [`last_index`]).
fn fits(len: usize, terms: &[(usize, usize)]) -> bool {
    let needed = last_index(terms);
    needed <= len && needed != usize::MAX
}

/// `dst (rows × cols, row-major) [+]= a (rows × inner; row stride, column stride) · b (inner × cols,
/// row-major)`; `cols` a multiple of [`LANES`]. Overwriting rows of 128 columns or more, it writes
/// them with streaming stores, which leave `dst` out of the caches: right for ∂W, read again only
/// after the whole backward pass (its one caller), wrong for an output read at once.
///
/// # Panics
/// If `cols` is not a multiple of [`LANES`], or if a slice is too short for its shape.
pub fn broadcast_product(
    dst: &mut [f32],
    (rows, cols, inner): (usize, usize, usize),
    a: (&[f32], usize, usize),
    b: &[f32],
    accumulate: bool,
) {
    let stream = !accumulate && cols >= STREAM_MIN_COLS;
    broadcast((dst, cols), (rows, cols, inner), a, (b, cols), (accumulate, stream))
}

/// [`broadcast_product`] on column blocks of wider matrices: `dst`'s rows are `dst.1` apart and
/// `b`'s `b.1`, and every store is a plain one (for an output read at once: attention's products).
/// Each element is the same FMA chain as gemm 0.19's packed path (its dot-product path aside:
/// there, `a` would be row-major and `b` column-major), so the bits are gemm's
/// (`attention_products_keep_gemms_bits`).
///
/// # Panics
/// If `cols` is not a multiple of [`LANES`], or if a slice is too short for its shape.
pub fn broadcast_product_strided(
    dst: (&mut [f32], usize),
    shape: (usize, usize, usize),
    a: (&[f32], usize, usize),
    b: (&[f32], usize),
    accumulate: bool,
) {
    broadcast(dst, shape, a, b, (accumulate, false))
}

fn broadcast(
    (dst, dst_rs): (&mut [f32], usize),
    (rows, cols, inner): (usize, usize, usize),
    a: (&[f32], usize, usize),
    (b, b_rs): (&[f32], usize),
    (accumulate, stream): (bool, bool),
) {
    assert!(cols % LANES == 0, "broadcast_product: cols must be a multiple of {LANES}, not {cols}");
    assert!(dst_rs >= cols && b_rs >= cols, "broadcast_product: rows overlap");
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(fits(dst.len(), &[(rows - 1, dst_rs), (1, cols)]));
    assert!(inner == 0 || fits(b.len(), &[(inner - 1, b_rs), (1, cols)]));
    assert!(inner == 0 || a.0.len() > last_index(&[(rows - 1, a.1), (inner - 1, a.2)]));
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX-512F is present; every index stays inside the asserted lengths.
        return unsafe { broadcast_avx512((dst, dst_rs), (rows, cols, inner), a, (b, b_rs), (accumulate, stream)) };
    }
    // The same FMA chains, one element at a time (slow: only where `available` is false).
    let (a, a_rs, a_cs) = a;
    for r in 0..rows {
        for (c, out) in dst[r * dst_rs..][..cols].iter_mut().enumerate() {
            let sum = (0..inner).fold(0.0f32, |acc, p| a[r * a_rs + p * a_cs].mul_add(b[p * b_rs + c], acc));
            *out = if accumulate { *out + sum } else { sum };
        }
    }
}

/// Rows at least this wide stream (see [`broadcast_avx512`]): a narrower row's edge vector is a
/// large share of its work.
const STREAM_MIN_COLS: usize = 128;

/// Overwriting, the tiles store with non-temporal (streaming) stores, which need 64-byte aligned
/// addresses: a ∂W is written once and read only after the whole backward pass, and a plain store
/// first reads each cache line it writes (one thread wrote 6–7 GB/s that way against 19 GB/s
/// streaming on the AVX-512 machine of issue 27; `results/engine/report/2026-12-06-streaming-stores.txt`).
/// So the columns are shifted by `head`, the first aligned one of the row; the `head` columns
/// before it and the 16 − `head` after the last aligned vector are one [`edge_tile`] vector per
/// row, plainly stored. Every element is still
/// one FMA chain over the inner dimension in order: the same bits, wherever the columns split.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn broadcast_avx512(
    (dst, dst_rs): (&mut [f32], usize),
    (rows, cols, inner): (usize, usize, usize),
    a: (&[f32], usize, usize),
    (b, b_rs): (&[f32], usize),
    (accumulate, stream): (bool, bool),
) {
    // Rows of whole vectors at a stride of whole vectors all have the same offset from a 64-byte
    // line (the streaming caller's rows are `cols` apart).
    debug_assert!(!stream || dst_rs == cols, "streaming rows are whole vectors, one after another");
    let head = if stream { (64 - dst.as_ptr() as usize % 64) % 64 / 4 } else { 0 };
    // The tiles' columns: whole vectors from `head`; with a shift, the last vector is the edge's.
    let end = if head > 0 { cols - LANES + head } else { cols };
    let strides = Strides { dst: dst_rs, b: b_rs, inner };
    let mut r = 0;
    if cols == LANES && head == 0 {
        // One vector a row (attention's heads of 16): 8 rows a tile keep 8 FMA chains in flight.
        while r + 8 <= rows {
            broadcast_tile::<8, 1>(dst, (r, head), strides, a, b, (accumulate, stream));
            r += 8;
        }
    }
    while r < rows {
        let tile_rows = (rows - r).min(4);
        let mut c = head;
        while c < end {
            let vectors = ((end - c) / LANES).min(4);
            // Plain loops, no closures: the tiles must inline into this AVX-512 function.
            let at = (r, c);
            if (tile_rows, vectors) == (4, 4) {
                broadcast_tile::<4, 4>(dst, at, strides, a, b, (accumulate, stream));
            } else if (tile_rows, vectors) == (4, 3) {
                // 4 rows, 3 vectors left: e.g. a 128-column row shifted for streaming (7 = 4 + 3)
                broadcast_tile::<4, 3>(dst, at, strides, a, b, (accumulate, stream));
            } else if tile_rows == 4 {
                for v in 0..vectors {
                    broadcast_tile::<4, 1>(dst, (r, c + v * LANES), strides, a, b, (accumulate, stream));
                }
            } else {
                for i in r..r + tile_rows {
                    for v in 0..vectors {
                        broadcast_tile::<1, 1>(dst, (i, c + v * LANES), strides, a, b, (accumulate, stream));
                    }
                }
            }
            c += vectors * LANES;
        }
        if head > 0 {
            if tile_rows == 4 {
                edge_tile::<4>(dst, (r, head, cols), strides, a, b);
            } else {
                for i in r..r + tile_rows {
                    edge_tile::<1>(dst, (i, head, cols), strides, a, b);
                }
            }
        }
        r += tile_rows;
    }
    if stream {
        // Streaming stores are weakly ordered: make them visible before another thread reads.
        _mm_sfence();
    }
}

/// Row strides of `dst` and `b`, and the inner dimension, for the tiles.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Strides {
    dst: usize,
    b: usize,
    inner: usize,
}

/// R rows of the columns an overwriting [`broadcast_avx512`] shifted out of its aligned vectors:
/// lanes 0..`head` are the row's first `head` columns, lanes `head`..16 its last 16 − `head`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn edge_tile<const R: usize>(
    dst: &mut [f32],
    (r, head, cols): (usize, usize, usize),
    s: Strides,
    (a, a_rs, a_cs): (&[f32], usize, usize),
    b: &[f32],
) {
    let low: __mmask16 = ((1u32 << head) - 1) as __mmask16;
    let mut acc = [_mm512_setzero_ps(); R];
    for p in 0..s.inner {
        let brow = b.as_ptr().add(p * s.b);
        let bv = _mm512_mask_loadu_ps(_mm512_maskz_loadu_ps(low, brow), !low, brow.add(cols - LANES));
        for (i, acc) in acc.iter_mut().enumerate() {
            let s = _mm512_set1_ps(*a.get_unchecked((r + i) * a_rs + p * a_cs));
            *acc = _mm512_fmadd_ps(s, bv, *acc);
        }
    }
    for (i, &x) in acc.iter().enumerate() {
        let row = dst.as_mut_ptr().add((r + i) * s.dst);
        _mm512_mask_storeu_ps(row, low, x);
        _mm512_mask_storeu_ps(row.add(cols - LANES), !low, x);
    }
}

/// R rows × V vectors of `dst` at (r, c): one FMA chain per element over the inner dimension.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn broadcast_tile<const R: usize, const V: usize>(
    dst: &mut [f32],
    (r, c): (usize, usize),
    s: Strides,
    (a, a_rs, a_cs): (&[f32], usize, usize),
    b: &[f32],
    (accumulate, stream): (bool, bool),
) {
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    for p in 0..s.inner {
        let brow = b.as_ptr().add(p * s.b + c);
        let mut bv = [_mm512_setzero_ps(); V];
        for (v, bv) in bv.iter_mut().enumerate() {
            *bv = _mm512_loadu_ps(brow.add(v * LANES));
        }
        for (i, acc_row) in acc.iter_mut().enumerate() {
            let s = _mm512_set1_ps(*a.get_unchecked((r + i) * a_rs + p * a_cs));
            for v in 0..V {
                acc_row[v] = _mm512_fmadd_ps(s, bv[v], acc_row[v]);
            }
        }
    }
    for (i, acc_row) in acc.iter().enumerate() {
        let row = dst.as_mut_ptr().add((r + i) * s.dst + c);
        store(row, acc_row, (accumulate, stream));
    }
}

/// One row of a tile: V vectors from `out`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store<const V: usize>(out: *mut f32, acc_row: &[__m512; V], (accumulate, stream): (bool, bool)) {
    debug_assert!(!(stream && accumulate), "a streamed store overwrites");
    for (v, &x) in acc_row.iter().enumerate() {
        let out = out.add(v * LANES);
        if stream {
            // 64-byte aligned: `broadcast_avx512` shifted the columns so.
            _mm512_stream_ps(out, x);
        } else {
            let x = if accumulate { _mm512_add_ps(_mm512_loadu_ps(out), x) } else { x };
            _mm512_storeu_ps(out, x);
        }
    }
}

/// `dst (rows × cols, row-major) [+]= a (rows × inner) · bᵀ` for `b` (cols × inner), both
/// row-major; `inner` a multiple of [`LANES`]. Each element is a dot product summed in 16 lanes,
/// then across them.
///
/// # Panics
/// If `inner` is not a multiple of [`LANES`], or if a slice is too short.
pub fn dot_product(
    dst: &mut [f32],
    (rows, cols, inner): (usize, usize, usize),
    a: &[f32],
    b: &[f32],
    accumulate: bool,
) {
    assert!(inner % LANES == 0, "dot_product: inner must be a multiple of {LANES}, not {inner}");
    assert!(fits(dst.len(), &[(rows, cols)]) && fits(a.len(), &[(rows, inner)]) && fits(b.len(), &[(cols, inner)]));
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX-512F is present; every index stays inside the asserted lengths.
        return unsafe { dot_avx512(dst, (rows, cols, inner), a, b, accumulate) };
    }
    // One element at a time, in 16 lanes (slow: only where `available` is false).
    for (o, out) in dst[..rows * cols].iter_mut().enumerate() {
        let (ar, br) = (&a[o / cols * inner..][..inner], &b[o % cols * inner..][..inner]);
        let mut lanes = [0.0f32; LANES];
        for (a16, b16) in ar.chunks_exact(LANES).zip(br.chunks_exact(LANES)) {
            for ((lane, x), y) in lanes.iter_mut().zip(a16).zip(b16) {
                *lane = x.mul_add(*y, *lane);
            }
        }
        let sum: f32 = lanes.iter().sum();
        *out = if accumulate { *out + sum } else { sum };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(
    dst: &mut [f32],
    (rows, cols, inner): (usize, usize, usize),
    a: &[f32],
    b: &[f32],
    accumulate: bool,
) {
    let mut r = 0;
    while r < rows {
        let tile_rows = (rows - r).min(4);
        let mut c = 0;
        while c < cols {
            let tile_cols = (cols - c).min(4);
            let at = (r, c, cols, inner);
            if (tile_rows, tile_cols) == (4, 4) {
                dot_tile::<4, 4>(dst, at, a, b, accumulate);
            } else {
                for i in r..r + tile_rows {
                    for j in c..c + tile_cols {
                        dot_tile::<1, 1>(dst, (i, j, cols, inner), a, b, accumulate);
                    }
                }
            }
            c += tile_cols;
        }
        r += tile_rows;
    }
}

/// R rows × C columns of `dst` at (r, c) as dot products of rows of `a` and `b`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_tile<const R: usize, const C: usize>(
    dst: &mut [f32],
    (r, c, cols, inner): (usize, usize, usize, usize),
    a: &[f32],
    b: &[f32],
    accumulate: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    for p in (0..inner).step_by(LANES) {
        let (mut av, mut bv) = ([_mm512_setzero_ps(); R], [_mm512_setzero_ps(); C]);
        for (i, av) in av.iter_mut().enumerate() {
            *av = _mm512_loadu_ps(a.as_ptr().add((r + i) * inner + p));
        }
        for (j, bv) in bv.iter_mut().enumerate() {
            *bv = _mm512_loadu_ps(b.as_ptr().add((c + j) * inner + p));
        }
        for i in 0..R {
            for j in 0..C {
                acc[i][j] = _mm512_fmadd_ps(av[i], bv[j], acc[i][j]);
            }
        }
    }
    for (i, acc_row) in acc.iter().enumerate() {
        for (j, &x) in acc_row.iter().enumerate() {
            let out = dst.get_unchecked_mut((r + i) * cols + c + j);
            let sum = _mm512_reduce_add_ps(x);
            *out = if accumulate { *out + sum } else { sum };
        }
    }
}
