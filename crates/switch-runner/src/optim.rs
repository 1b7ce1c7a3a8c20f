//! The optimizers: AdamW (this project's default) and Adafactor (the paper's, as configured in
//! Mesh TensorFlow's T5 and Switch runs).
//!
//! Both keep their state on the host, one entry per parameter in `params_mut` order, in two
//! buffers per parameter (`m`, `v`) of the parameter's length, so one checkpoint format serves
//! both. Adafactor has no first moment (β₁ = 0: `m` stays zero) and keeps its second moment in
//! `v`: whole for small matrices and vectors, factored into row and column means for matrices whose
//! both sides have at least [`MIN_DIM_TO_FACTOR`] entries (the first `batch·(rows + cols)` floats).
//!
//! ```
//! use switch_runner::config::{OptimizerKind, TrainConfig};
//! use switch_runner::optim::OptimizerState;
//! // Adafactor's first step on a 2-vector: v = g² (the decay is 0 at step 1), the update
//! // g/√v = ±1 has RMS 1 (no clipping), and it is scaled by lr × max(RMS(p), 10⁻³).
//! let cfg = TrainConfig { optimizer: OptimizerKind::Adafactor, ..Default::default() };
//! let mut opt = OptimizerState::new(cfg.optimizer, &[[1, 1, 2]]);
//! let mut p = vec![0.5f32, -0.5];
//! opt.update(0, &mut p, &[2.0, -0.1], 1.0, 1, 0.01, &cfg);
//! assert_eq!(p, vec![0.5 - 0.005, -0.5 + 0.005]);
//! assert_eq!(opt.v[0], vec![4.0, 0.010000001]);
//! ```
use crate::config::{MomentPrecision, OptimizerKind, TrainConfig};
use rayon::prelude::*;
use std::borrow::Cow;
use switch_model::wide;

/// Adafactor factors a matrix's second moment only when both its sides are at least this long
/// (Mesh TF's `min_dim_size_to_factor`): small matrices keep every entry.
pub const MIN_DIM_TO_FACTOR: usize = 128;
/// Adafactor's constants in the T5 / Switch runs: ε₁ added to g², the floor ε₂ of the parameter
/// scale, the update-RMS clipping threshold and the second-moment decay exponent.
const EPS1: f32 = 1e-30;
const EPS2: f32 = 1e-3;
const CLIP_THRESHOLD: f32 = 1.0;
const DECAY_EXPONENT: f64 = 0.8;

/// Element-wise loops over chunks of this many floats go to the run's threads.
const CHUNK: usize = 1 << 15;

pub struct OptimizerState {
    pub kind: OptimizerKind,
    /// Each parameter as `[batch, rows, cols]` (its `ModelParam::shape`).
    shapes: Vec<[usize; 3]>,
    /// The moments in f32 (empty with bf16 moments).
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    /// AdamW's (m, v) per parameter as bf16 bit patterns, with `train.optimizer_moments: bf16`.
    bf16: Vec<(Vec<u16>, Vec<u16>)>,
}

impl OptimizerState {
    pub fn new(kind: OptimizerKind, shapes: &[[usize; 3]]) -> Self {
        let zeros = || shapes.iter().map(|s| vec![0.0; s.iter().product()]).collect();
        Self { kind, shapes: shapes.to_vec(), m: zeros(), v: zeros(), bf16: Vec::new() }
    }

    /// This state with its moments stored in `precision` (bf16: AdamW only, see
    /// [`MomentPrecision::Bf16`]).
    pub fn with_moments(mut self, precision: MomentPrecision) -> Self {
        if precision == MomentPrecision::Bf16 {
            assert_eq!(self.kind, OptimizerKind::Adamw, "bf16 moments are AdamW's");
            let half = |x: &Vec<f32>| x.iter().map(|&x| bf16_bits(x)).collect();
            self.bf16 = self.m.iter().zip(&self.v).map(|(m, v)| (half(m), half(v))).collect();
            (self.m, self.v) = (Vec::new(), Vec::new());
        }
        self
    }

    /// Parameter `k`'s (m, v) in f32, as a checkpoint stores them.
    pub fn moments(&self, k: usize) -> [Cow<'_, [f32]>; 2] {
        match self.bf16.get(k) {
            Some((m, v)) => [m, v].map(|x| Cow::Owned(x.iter().map(|&h| from_bf16_bits(h)).collect())),
            None => [Cow::Borrowed(&self.m[k][..]), Cow::Borrowed(&self.v[k][..])],
        }
    }

    /// Sets parameter `k`'s (m, v) from f32 values (a checkpoint's; exact for bf16 moments, whose
    /// checkpoints hold bf16 values).
    pub fn set_moments(&mut self, k: usize, m: &[f32], v: &[f32]) {
        match self.bf16.get_mut(k) {
            Some((hm, hv)) => {
                hm.iter_mut().zip(m).for_each(|(h, &x)| *h = bf16_bits(x));
                hv.iter_mut().zip(v).for_each(|(h, &x)| *h = bf16_bits(x));
            }
            None => {
                self.m[k].copy_from_slice(m);
                self.v[k].copy_from_slice(v);
            }
        }
    }

    /// AdamW over flat parameters of these lengths.
    pub fn adamw(sizes: &[usize]) -> Self {
        Self::new(OptimizerKind::Adamw, &sizes.iter().map(|&n| [1, 1, n]).collect::<Vec<_>>())
    }

    /// One update of `params` with `grads` (already clipped) at optimizer step `t` (1-based).
    pub fn step(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], t: u64, lr: f64, cfg: &TrainConfig) {
        for (k, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            self.update(k, p, g, 1.0, t, lr, cfg);
        }
    }

    /// Updates parameter `k`'s weights `p` with gradient `g × grad_scale` (the clipping factor).
    pub fn update(&mut self, k: usize, p: &mut [f32], g: &[f32], grad_scale: f32, t: u64, lr: f64, cfg: &TrainConfig) {
        match self.kind {
            OptimizerKind::Adamw if !self.bf16.is_empty() => {
                let (m, v) = &mut self.bf16[k];
                adamw_bf16(p, g, (m, v), grad_scale, AdamStep::new(cfg, t, lr))
            }
            OptimizerKind::Adamw => {
                adamw(p, g, (&mut self.m[k], &mut self.v[k]), grad_scale, AdamStep::new(cfg, t, lr))
            }
            OptimizerKind::Adafactor => adafactor(p, g, &mut self.v[k], self.shapes[k], grad_scale, t, lr),
        }
    }
}

/// AdamW's per-step scalars: β₁, β₂, the bias corrections 1 − βᵗ, learning rate, weight decay.
struct AdamStep {
    b1: f32,
    b2: f32,
    c1: f32,
    c2: f32,
    lr: f32,
    wd: f32,
}

impl AdamStep {
    fn new(cfg: &TrainConfig, t: u64, lr: f64) -> Self {
        Self {
            b1: cfg.beta1 as f32,
            b2: cfg.beta2 as f32,
            c1: 1.0 - cfg.beta1.powi(t as i32) as f32,
            c2: 1.0 - cfg.beta2.powi(t as i32) as f32,
            lr: lr as f32,
            wd: cfg.weight_decay as f32,
        }
    }
}

/// `update` over matching chunks of weights, gradient and moments, on the run's threads for a
/// large parameter: the update is element-wise, so splitting it keeps every bit.
fn by_chunks<M: Send>(
    (p, g): (&mut [f32], &[f32]),
    (m, v): (&mut [M], &mut [M]),
    update: impl Fn(&mut [f32], &[f32], &mut [M], &mut [M]) + Sync,
) {
    if rayon::current_num_threads() > 1 && p.len() > CHUNK {
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((p, g), (m, v))| update(p, g, m, v));
    } else {
        update(p, g, m, v);
    }
}

fn adamw(p: &mut [f32], g: &[f32], (m, v): (&mut [f32], &mut [f32]), grad_scale: f32, s: AdamStep) {
    let AdamStep { b1, b2, c1, c2, lr, wd } = s;
    by_chunks((p, g), (m, v), |p, g, m, v| {
        // zipped slices, no indexing: the compiler vectorises the loop
        wide!(|| {
            for (((p, g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                let g = g * grad_scale; // × 1.0 is exact: unclipped steps keep their bits
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                *p -= lr * ((*m / c1) / ((*v / c2).sqrt() + 1e-8) + wd * *p);
            }
        })
    });
}

/// `x` rounded to bf16 (its upper 16 bits, to nearest even), as a bit pattern; NaN stays NaN.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    // A NaN's payload could carry into the sign bit; keep it a quiet NaN (a select, no branch).
    let nan = (b & 0x7fff_ffff > 0x7f80_0000) as u16;
    rounded * (1 - nan) + 0x7fc0 * nan
}

/// The f32 value of bf16 bits `h` (exact).
#[inline(always)]
pub fn from_bf16_bits(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// [`adamw`] with m and v stored in bf16: each update reads them into f32, computes as `adamw`
/// does, and rounds them back to nearest. Half the moments' memory and traffic (20 bytes a
/// parameter a step instead of 28); m and v keep 8 significant bits.
fn adamw_bf16(p: &mut [f32], g: &[f32], (m, v): (&mut [u16], &mut [u16]), grad_scale: f32, s: AdamStep) {
    let AdamStep { b1, b2, c1, c2, lr, wd } = s;
    // Divisions by the bias corrections as products with their reciprocals: vdivps is the
    // loop's bottleneck, and this option's numbers are its own anyway.
    let (r1, r2) = (1.0 / c1, 1.0 / c2);
    by_chunks((p, g), (m, v), |p, g, m, v| {
        wide!(|| {
            for (((p, g), hm), hv) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                let g = g * grad_scale;
                let m = b1 * from_bf16_bits(*hm) + (1.0 - b1) * g;
                let v = b2 * from_bf16_bits(*hv) + (1.0 - b2) * g * g;
                *p -= lr * ((m * r1) / ((v * r2).sqrt() + 1e-8) + wd * *p);
                (*hm, *hv) = (bf16_bits(m), bf16_bits(v));
            }
        })
    });
}

/// Σ f(chunk) in f64 over `x` cut into chunks of `chunk` elements, on the run's threads, the
/// partial sums added in order: the same bits on any number of threads.
fn chunked_sum<T: Sync>(x: &[T], chunk: usize, f: impl Fn(&[T]) -> f64 + Sync) -> f64 {
    if x.len() <= chunk {
        return f(x);
    }
    let parts: Vec<f64> = if rayon::current_num_threads() > 1 {
        x.par_chunks(chunk).map(&f).collect()
    } else {
        x.chunks(chunk).map(&f).collect()
    };
    parts.iter().sum()
}

/// Σ x² in f64 (a gradient's share of the global norm, a weight's RMS): `chunked_sum` of
/// chunks summed in eight interleaved lanes, which the compiler vectorises (one running sum would
/// wait on every addition).
pub fn sum_of_squares(x: &[f32]) -> f64 {
    chunked_sum(x, CHUNK, |x| wide!(|| lane_sum(x, x, |v, _| (v as f64) * (v as f64))))
}

/// Σ term(a[i], b[i]) in f64, in eight interleaved partial sums (the rest of the last eight
/// summed apart and added at the end).
#[inline(always)]
fn lane_sum(a: &[f32], b: &[f32], term: impl Fn(f32, f32) -> f64) -> f64 {
    let mut lanes = [0f64; 8];
    let (xs, ys) = (a.chunks_exact(8), b.chunks_exact(8));
    let rest: f64 = xs.remainder().iter().zip(ys.remainder()).map(|(&x, &y)| term(x, y)).sum();
    for (x8, y8) in xs.zip(ys) {
        for ((lane, &x), &y) in lanes.iter_mut().zip(x8).zip(y8) {
            *lane += term(x, y);
        }
    }
    lanes.iter().sum::<f64>() + rest
}

/// Root mean square of `x`, summed in f64.
fn rms(x: &[f32]) -> f32 {
    (sum_of_squares(x) / x.len().max(1) as f64).sqrt() as f32
}

/// Adafactor's factored second moments of one variable, updated in place: `vr` (`[batch, rows]`)
/// and `vc` (`[batch, cols]`) decay towards the row and column means of (g·scale)² + ε₁.
fn factored_moments(g: &[f32], (vr, vc): (&mut [f32], &mut [f32]), shape: [usize; 3], grad_scale: f32, decay: f32) {
    let [batch, rows, cols] = shape;
    let mix = 1.0 - decay;
    // Each stacked matrix (expert) on its own: in parallel, every bit kept.
    let moments = |((gb, vr), vc): ((&[f32], &mut [f32]), &mut [f32])| {
        wide!(|| {
            let mut col_sums = vec![0f64; cols];
            for (r, row) in gb.chunks_exact(cols).enumerate() {
                let sq = |x: f32| ((x * grad_scale) * (x * grad_scale) + EPS1) as f64;
                // The row sum in eight interleaved partial sums (as `lane_sum`), the column sums beside it.
                let mut lanes = [0f64; 8];
                let (mut xs, mut cs) = (row.chunks_exact(8), col_sums.chunks_exact_mut(8));
                for (x8, c8) in (&mut xs).zip(&mut cs) {
                    for ((lane, c), &x) in lanes.iter_mut().zip(c8).zip(x8) {
                        *lane += sq(x);
                        *c += sq(x);
                    }
                }
                for (&x, c) in xs.remainder().iter().zip(cs.into_remainder()) {
                    lanes[0] += sq(x);
                    *c += sq(x);
                }
                let row_sum: f64 = lanes.iter().sum();
                vr[r] = decay * vr[r] + mix * (row_sum / cols as f64) as f32;
            }
            for (vc, s) in vc.iter_mut().zip(col_sums) {
                *vc = decay * *vc + mix * (s / rows as f64) as f32;
            }
        })
    };
    let matrix = rows * cols;
    if rayon::current_num_threads() > 1 && batch > 1 {
        g.par_chunks(matrix).zip(vr.par_chunks_mut(rows)).zip(vc.par_chunks_mut(cols)).for_each(moments);
    } else {
        g.chunks(matrix).zip(vr.chunks_mut(rows)).zip(vc.chunks_mut(cols)).for_each(moments);
    }
}

/// Adafactor (Shazeer & Stern 2018) as Mesh TF's T5 runs use it: β₁ = 0, second-moment decay
/// 1 − t^−0.8, update clipped to RMS ≤ 1, step = lr × max(RMS(p), ε₂) (relative to the
/// parameter's scale), no weight decay. `v`: the whole second moment, or for a factored matrix
/// the row means (`batch·rows`) followed by the column means (`batch·cols`).
fn adafactor(p: &mut [f32], g: &[f32], v: &mut [f32], shape: [usize; 3], grad_scale: f32, t: u64, lr: f64) {
    let decay = (1.0 - (t as f64).powf(-DECAY_EXPONENT)) as f32;
    let mix = 1.0 - decay;
    let [batch, rows, cols] = shape;
    let step = lr as f32 * rms(p).max(EPS2);
    if rows.min(cols) < MIN_DIM_TO_FACTOR {
        wide!(|| {
            for (v, &x) in v.iter_mut().zip(g) {
                *v = decay * *v + mix * ((x * grad_scale) * (x * grad_scale) + EPS1);
            }
        });
        apply_clipped(
            p,
            step,
            #[inline(always)]
            |i| g[i] * grad_scale * (1.0 / v[i].sqrt()),
        );
        return;
    }
    // Factored: row and column means of g², per stacked matrix.
    let (vr, vc) = v[..batch * (rows + cols)].split_at_mut(batch * rows);
    factored_moments(g, (vr, vc), shape, grad_scale, decay);
    // v̂ = row · column / mean(row): the rank-1 estimate, as 1/√ of its two factors.
    let mut r_factor = vec![0f32; batch * rows];
    for (rf, vr) in r_factor.chunks_exact_mut(rows).zip(vr.chunks_exact(rows)) {
        let mean = vr.iter().map(|&x| x as f64).sum::<f64>() / rows as f64;
        for (f, &x) in rf.iter_mut().zip(vr) {
            *f = 1.0 / ((x as f64 / mean) as f32).sqrt();
        }
    }
    let c_factor: Vec<f32> = vc.iter().map(|&x| 1.0 / x.sqrt()).collect();
    // Row by row (row k of the stack is row k % rows of matrix k / rows): u = g·scale·r·c.
    let factors = |k: usize| (r_factor[k], &c_factor[k / rows * cols..][..cols]);
    // Σu² over blocks of whole rows (row k of block b is row b·block + k of the stack).
    let block = (CHUNK / cols).max(1) * cols;
    let blocks: Vec<(usize, &[f32])> = g.chunks(block).enumerate().collect();
    let u_sq = chunked_sum(&blocks, 1, |b| {
        let (b, g) = b[0];
        wide!(|| {
            let mut sum = 0f64;
            for (k, g) in g.chunks_exact(cols).enumerate() {
                let (rf, cf) = factors(b * block / cols + k);
                sum += lane_sum(g, cf, |x, c| (x * grad_scale * (rf * c)) as f64 * (x * grad_scale * (rf * c)) as f64);
            }
            sum
        })
    });
    let step = clipped_step(step, u_sq, p.len());
    let apply = |(k, (p, g)): (usize, (&mut [f32], &[f32]))| {
        let (rf, cf) = factors(k);
        wide!(|| {
            for ((p, &x), &c) in p.iter_mut().zip(g).zip(cf) {
                *p -= step * (x * grad_scale * (rf * c));
            }
        })
    };
    // Element-wise, so the run's threads keep every bit.
    if rayon::current_num_threads() > 1 && p.len() > CHUNK {
        p.par_chunks_mut(cols).zip(g.par_chunks(cols)).enumerate().for_each(apply);
    } else {
        p.chunks_mut(cols).zip(g.chunks(cols)).enumerate().for_each(apply);
    }
}

/// Adafactor's update clipping, over the whole variable: the step divided by max(1, RMS(u) /
/// threshold), with Σu² summed in f64.
fn clipped_step(step: f32, u_sq: f64, n: usize) -> f32 {
    let u_rms = (u_sq / n.max(1) as f64).sqrt() as f32;
    step / (u_rms / CLIP_THRESHOLD).max(1.0)
}

/// p −= step × u / max(1, RMS(u) / threshold): Adafactor's update clipping, over the whole variable.
/// `u` is inlined into the AVX2 loop only when it is marked `#[inline(always)]` (see `wide!`).
#[inline(always)]
fn apply_clipped(p: &mut [f32], step: f32, u: impl Fn(usize) -> f32) {
    let u_sq = (0..p.len()).map(&u).fold(0.0f64, |a, v| a + (v as f64) * (v as f64));
    let step = clipped_step(step, u_sq, p.len());
    wide!(|| {
        for (i, p) in p.iter_mut().enumerate() {
            *p -= step * u(i);
        }
    })
}
