//! Each fused kernel against the plain dfdx path it replaces (outputs and gradients) and against
//! central finite differences.
use dfdx::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use switch_model::kernels::{
    attention_fused, attention_plain, combine_fused, combine_plain, cross_entropy_fused, cross_entropy_plain,
    dot_constant_fused, dot_constant_plain, expert_matmul_fused, gather_rows_fused, gather_rows_plain,
    logsumexp_sq_mean_fused, logsumexp_sq_mean_plain, mul_constant_fused, mul_constant_plain, param_matmul_fused,
    param_matmul_plain, relu_fused, relu_plain, residual_add_fused, residual_add_plain, rms_norm_fused, rms_norm_plain,
    softmax_rows_fused, softmax_rows_plain, Act3, PositionBias, Stacked,
};
use switch_model::nn::{Act, Param};

type Dev = Cpu;

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

/// Σ y ⊙ c for a fixed random `c`: every output entry gets its own gradient.
fn weighted_sum<T: Tape<f32, Dev> + Merge<NoneTape>>(y: Act<Dev, T>, c: &[f32]) -> Tensor<(), f32, Dev, T> {
    let dev = y.device().clone();
    let shape = *y.shape();
    (y * dev.tensor_from_vec(c.to_vec(), shape)).sum()
}

/// A thread pool of each size.
fn pools<const N: usize>(threads: [usize; N]) -> [rayon::ThreadPool; N] {
    threads.map(|n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap())
}

/// Each value's bits (so −0 differs from +0, and NaN equals itself).
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

type Norm = fn(Act<Dev, OwnedTape<f32, Dev>>, &Param<Dev>) -> Act<Dev, OwnedTape<f32, Dev>>;

/// Output, ∂/∂x and ∂/∂w of Σ norm(x, w) ⊙ c.
fn run(norm: Norm, dev: &Dev, x: &[f32], w: &[f32], c: &[f32], d: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let xt = dev.tensor_from_vec(x.to_vec(), (x.len() / d, d));
    let wt = dev.tensor_from_vec(w.to_vec(), (d,));
    let y = norm(xt.clone().leaky_traced(), &wt);
    let out = y.as_vec();
    let grads = weighted_sum(y, c).backward();
    (out, grads.get(&xt).as_vec(), grads.get(&wt).as_vec())
}

fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{what}[{i}]: {x} vs {y}");
    }
}

#[test]
fn fused_rms_norm_matches_the_plain_path() {
    let dev = Dev::default();
    let mut rng = StdRng::seed_from_u64(1);
    for (n, d, scale) in [(1, 1, 1.0), (5, 7, 1.0), (33, 64, 3.0), (4, 16, 1e-3)] {
        let (x, w, c) = (random(&mut rng, n * d, scale), random(&mut rng, d, 2.0), random(&mut rng, n * d, 1.0));
        let fused = run(rms_norm_fused, &dev, &x, &w, &c, d);
        let plain = run(rms_norm_plain, &dev, &x, &w, &c, d);
        close(&fused.0, &plain.0, 1e-5, "y");
        close(&fused.1, &plain.1, 1e-4, "dx");
        close(&fused.2, &plain.2, 1e-4, "dw");
    }
}

/// The fused RMSNorm's arithmetic written as one serial loop (as it was before its rows went to
/// threads): y, ∂x written as `0 + v` (its first writer), and ∂w summed over the rows in order,
/// for the output gradient `g`.
fn rms_norm_serial(x: &[f32], w: &[f32], g: &[f32]) -> [Vec<f32>; 3] {
    let d = w.len();
    let (mut y, mut gx, mut gw) = (vec![0f32; x.len()], vec![0f32; x.len()], vec![0f32; d]);
    for (i, row) in x.chunks_exact(d).enumerate() {
        let r = 1.0 / (row.iter().map(|v| v * v).sum::<f32>() / d as f32 + switch_model::kernels::RMS_EPS).sqrt();
        let gy = &g[i * d..(i + 1) * d];
        let dot: f32 = row.iter().zip(gy).zip(w).map(|((v, g), wj)| g * wj * v).sum::<f32>() / d as f32;
        let k = r * r * r * dot;
        for j in 0..d {
            y[i * d + j] = r * row[j] * w[j];
            gx[i * d + j] = 0.0 + (r * gy[j] * w[j] - row[j] * k);
            gw[j] += gy[j] * row[j] * r;
        }
    }
    [y, gx, gw]
}

#[test]
fn fused_rms_norm_keeps_its_serial_bits_on_one_two_and_three_threads() {
    // Shapes that split into several row chunks (one ragged) and columns that split unevenly.
    let (dev, mut rng, pools) = (Dev::default(), StdRng::seed_from_u64(4), pools([1, 2, 3]));
    for (n, d) in [(300, 256), (700, 100), (9, 7)] {
        let (x, w, c) = (random(&mut rng, n * d, 2.0), random(&mut rng, d, 2.0), random(&mut rng, n * d, 1.0));
        let serial = rms_norm_serial(&x, &w, &c);
        for pool in &pools {
            let (y, dx, dw) = pool.install(|| run(rms_norm_fused, &dev, &x, &w, &c, d));
            let threads = pool.current_num_threads();
            for (what, got, want) in [("y", &y, &serial[0]), ("dx", &dx, &serial[1]), ("dw", &dw, &serial[2])] {
                assert!(bits(got) == bits(want), "{what}, [{n}, {d}] on {threads} threads: not the serial bits");
            }
        }
    }
}

#[test]
fn fused_rms_norm_gradients_match_finite_differences() {
    let dev = Dev::default();
    let mut rng = StdRng::seed_from_u64(2);
    let (n, d) = (3, 5);
    let (x, w, c) = (random(&mut rng, n * d, 1.0), random(&mut rng, d, 2.0), random(&mut rng, n * d, 1.0));
    let (_, dx, dw) = run(rms_norm_fused, &dev, &x, &w, &c, d);
    let loss = |x: &[f32], w: &[f32]| -> f64 {
        let y = rms_norm_fused(dev.tensor_from_vec(x.to_vec(), (n, d)), &dev.tensor_from_vec(w.to_vec(), (d,)));
        y.as_vec().iter().zip(&c).map(|(a, b)| (*a as f64) * (*b as f64)).sum()
    };
    let eps = 1e-3f32;
    let fd = |v: &[f32], i: usize, f: &dyn Fn(&[f32]) -> f64| {
        let (mut up, mut down) = (v.to_vec(), v.to_vec());
        up[i] += eps;
        down[i] -= eps;
        (f(&up) - f(&down)) / (2.0 * eps as f64)
    };
    assert_eq!((dx.len(), dw.len()), (n * d, d));
    for (i, &g) in dx.iter().enumerate() {
        let numeric = fd(&x, i, &|x| loss(x, &w));
        assert!((numeric - g as f64).abs() < 2e-3 * (1.0 + numeric.abs()), "dx[{i}]: {numeric} vs {g}");
    }
    for (j, &g) in dw.iter().enumerate() {
        let numeric = fd(&w, j, &|w| loss(&x, w));
        assert!((numeric - g as f64).abs() < 2e-3 * (1.0 + numeric.abs()), "dw[{j}]: {numeric} vs {g}");
    }
}

#[test]
fn fused_rms_norm_accumulates_into_existing_gradients() {
    // The same input normalised twice (as the residual stream is, by two blocks' norms): both
    // backward passes add to its gradient instead of overwriting it.
    let dev = Dev::default();
    let mut rng = StdRng::seed_from_u64(3);
    let (n, d) = (4, 6);
    let (x, w, c) = (random(&mut rng, n * d, 1.0), random(&mut rng, d, 2.0), random(&mut rng, n * d, 1.0));
    let twice = |norm: Norm| {
        let xt = dev.tensor_from_vec(x.clone(), (n, d));
        let wt = dev.tensor_from_vec(w.clone(), (d,));
        let (xa, tape) = xt.clone().leaky_traced().split_tape();
        let a = norm(xa.clone().put_tape(tape), &wt);
        let (a, tape) = a.split_tape();
        let b = norm(xa.put_tape(tape), &wt);
        let grads = (weighted_sum(a.retaped(), &c) + weighted_sum(b, &c)).backward();
        (grads.get(&xt).as_vec(), grads.get(&wt).as_vec())
    };
    let (fused, plain) = (twice(rms_norm_fused), twice(rms_norm_plain));
    close(&fused.0, &plain.0, 1e-4, "dx");
    close(&fused.1, &plain.1, 1e-4, "dw");
}

type Matmul = fn(Act3<Dev, OwnedTape<f32, Dev>>, &Param<Dev>, Stacked) -> Act3<Dev, OwnedTape<f32, Dev>>;

/// Output, ∂/∂x and ∂/∂w of Σ (x · W) ⊙ c, for `x` `[E, c, k]`.
fn run_matmul(
    mm: Matmul,
    dev: &Dev,
    x: &[f32],
    w: &[f32],
    c: &[f32],
    layout: Stacked,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let tokens = x.len() / (layout.experts * layout.k);
    let xt = dev.tensor_from_vec(x.to_vec(), (layout.experts, tokens, layout.k));
    let wt = dev.tensor_from_vec(w.to_vec(), (w.len(),));
    let y = mm(xt.clone().leaky_traced(), &wt, layout);
    let out = y.as_vec();
    let shape = *y.shape();
    let grads = (y * dev.tensor_from_vec(c.to_vec(), shape)).sum().backward();
    (out, grads.get(&xt).as_vec(), grads.get(&wt).as_vec())
}

fn layouts() -> Vec<(usize, Stacked)> {
    let s = |experts, k, m, transposed| Stacked { experts, k, m, transposed };
    vec![
        (1, s(1, 1, 1, false)),
        (5, s(1, 7, 3, false)),
        (9, s(3, 4, 6, false)),
        (4, s(2, 5, 11, true)),
        (70, s(1, 64, 130, true)),
        (33, s(8, 16, 40, false)),
    ]
}

#[test]
fn fused_param_matmul_matches_the_plain_path_on_one_and_two_threads() {
    let dev = Dev::default();
    let mut rng = StdRng::seed_from_u64(4);
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        for (tokens, l) in layouts() {
            let (x, w) =
                (random(&mut rng, l.experts * tokens * l.k, 1.0), random(&mut rng, l.experts * l.k * l.m, 1.0));
            let c = random(&mut rng, l.experts * tokens * l.m, 1.0);
            let fused = pool.install(|| run_matmul(param_matmul_fused, &dev, &x, &w, &c, l));
            let plain = run_matmul(param_matmul_plain, &dev, &x, &w, &c, l);
            close(&fused.0, &plain.0, 1e-5, "y");
            close(&fused.1, &plain.1, 1e-5, "dx");
            close(&fused.2, &plain.2, 1e-5, "dw");
        }
    }
}

#[test]
fn fused_param_matmul_overwrites_the_stale_buffers_it_takes_from_the_cache() {
    // As the first writer of a gradient the kernel takes a buffer from dfdx's cache without
    // zeroing it and overwrites it: fill the cache with NaN buffers of every size it could take,
    // and no NaN may come through (one element left unwritten would show).
    let mut rng = StdRng::seed_from_u64(7);
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        for (tokens, l) in layouts() {
            let cached = Dev::default();
            cached.enable_cache();
            let sizes = [l.experts * tokens * l.k, l.experts * l.k * l.m, l.experts * tokens * l.m];
            for &n in sizes.iter().cycle().take(3 * 8) {
                drop(cached.tensor_from_vec(vec![f32::NAN; n], (n,)));
            }
            let (x, w) =
                (random(&mut rng, l.experts * tokens * l.k, 1.0), random(&mut rng, l.experts * l.k * l.m, 1.0));
            let c = random(&mut rng, l.experts * tokens * l.m, 1.0);
            let fused = pool.install(|| run_matmul(param_matmul_fused, &cached, &x, &w, &c, l));
            let plain = run_matmul(param_matmul_plain, &Dev::default(), &x, &w, &c, l);
            close(&fused.1, &plain.1, 1e-5, "dx");
            close(&fused.2, &plain.2, 1e-5, "dw");
        }
    }
}

/// `dx`, `dw` against central differences (ε = 0.01) of `loss(x, w)`, each to 1e-3 relative.
fn assert_gradients_match_finite_differences(
    (x, w): (&[f32], &[f32]),
    (dx, dw): (&[f32], &[f32]),
    loss: &dyn Fn(&[f32], &[f32]) -> f64,
) {
    let eps = 1e-2f32;
    let fd = |v: &[f32], i: usize, f: &dyn Fn(&[f32]) -> f64| {
        let (mut up, mut down) = (v.to_vec(), v.to_vec());
        up[i] += eps;
        down[i] -= eps;
        (f(&up) - f(&down)) / (2.0 * eps as f64)
    };
    assert_eq!((dx.len(), dw.len()), (x.len(), w.len()));
    for (i, &g) in dx.iter().enumerate() {
        let numeric = fd(x, i, &|x| loss(x, w));
        assert!((numeric - g as f64).abs() < 1e-3 * (1.0 + numeric.abs()), "dx[{i}]: {numeric} vs {g}");
    }
    for (j, &g) in dw.iter().enumerate() {
        let numeric = fd(w, j, &|w| loss(x, w));
        assert!((numeric - g as f64).abs() < 1e-3 * (1.0 + numeric.abs()), "dw[{j}]: {numeric} vs {g}");
    }
}

#[test]
fn fused_param_matmul_gradients_match_finite_differences() {
    let dev = Dev::default();
    let mut rng = StdRng::seed_from_u64(5);
    for transposed in [false, true] {
        let (tokens, l) = (3, Stacked { experts: 2, k: 4, m: 5, transposed });
        let (x, w) = (random(&mut rng, 2 * tokens * 4, 1.0), random(&mut rng, 2 * 4 * 5, 1.0));
        let c = random(&mut rng, 2 * tokens * 5, 1.0);
        let (_, dx, dw) = run_matmul(param_matmul_fused, &dev, &x, &w, &c, l);
        let loss = |x: &[f32], w: &[f32]| -> f64 {
            let xt = dev.tensor_from_vec(x.to_vec(), (2, tokens, 4));
            let y = param_matmul_fused(xt, &dev.tensor_from_vec(w.to_vec(), (w.len(),)), l);
            y.as_vec().iter().zip(&c).map(|(a, b)| (*a as f64) * (*b as f64)).sum()
        };
        assert_gradients_match_finite_differences((&x, &w), (&dx, &dw), &loss);
    }
}

#[test]
fn fused_param_matmul_accumulates_into_existing_gradients() {
    // The tied embedding: gathered as the input embedding and used transposed as the output
    // layer, both gradients land on the one parameter.
    let dev = Dev::default();
    let mut rng = StdRng::seed_from_u64(6);
    let (v, d, n) = (7, 4, 5);
    let (emb, x, c) = (random(&mut rng, v * d, 1.0), random(&mut rng, n * d, 1.0), random(&mut rng, n * v, 1.0));
    let both = |mm: Matmul| {
        let et = dev.tensor_from_vec(emb.clone(), (v * d,));
        let xt = dev.tensor_from_vec(x.clone(), (1, n, d));
        let (e, tape) = et.clone().leaky_traced().split_tape();
        let rows = e.clone().put_tape(tape).reshape_like(&(v, d)).gather(dev.tensor_from_vec(vec![1, 3, 3], (3,)));
        let (rows, tape) = rows.split_tape();
        let logits = mm(xt.put_tape(tape), &et, Stacked { experts: 1, k: d, m: v, transposed: true });
        let loss = weighted_sum(rows.retaped::<OwnedTape<f32, Dev>>(), &[1.0; 12])
            + weighted_sum(logits.reshape_like(&(n, v)), &c);
        loss.backward().get(&et).as_vec()
    };
    close(&both(param_matmul_fused), &both(param_matmul_plain), 1e-5, "d emb");
}

/// Output, ∂/∂x and ∂/∂w of Σ (x · W) ⊙ c + Σ (x · W) ⊙ c2 with `x` used twice (GEGLU's two
/// products of one input: the second ∂x accumulates), by `mm`, on `dev`.
fn run_twice(
    mm: &dyn Fn(Act3<Dev, OwnedTape<f32, Dev>>, &Param<Dev>) -> Act3<Dev, OwnedTape<f32, Dev>>,
    dev: &Dev,
    (x, w): (&[f32], &[f32]),
    (c, c2): (&[f32], &[f32]),
    shape: (usize, usize, usize),
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let xt = dev.tensor_from_vec(x.to_vec(), shape);
    let wt = dev.tensor_from_vec(w.to_vec(), (w.len(),));
    let (x1, tape) = xt.clone().leaky_traced().split_tape();
    let y = mm(x1.clone().put_tape(tape), &wt);
    let (y, tape) = y.split_tape();
    let y2 = mm(x1.put_tape(tape), &wt);
    let out = y.as_vec();
    let shape = *y.shape();
    let loss = (y.retaped::<OwnedTape<f32, Dev>>() * dev.tensor_from_vec(c.to_vec(), shape)).sum()
        + (y2 * dev.tensor_from_vec(c2.to_vec(), shape)).sum();
    let grads = loss.backward();
    (out, grads.get(&xt).as_vec(), grads.get(&wt).as_vec())
}

/// Rows of expert slots `[E, tokens, len]` in use (1) or not (0).
fn rows_in_use_mask(in_use: &[usize], tokens: usize, len: usize) -> Vec<f32> {
    (0..in_use.len() * tokens * len)
        .map(|i| if (i / len) % tokens < in_use[i / (tokens * len)] { 1.0 } else { 0.0 })
        .collect()
}

fn masked(v: &[f32], mask: &[f32]) -> Vec<f32> {
    v.iter().zip(mask).map(|(a, b)| a * b).collect()
}

#[test]
fn expert_matmul_matches_the_plain_path_on_the_rows_in_use_and_zeroes_the_rest() {
    // Slots past an expert's rows in use hold no token and get no gradient (their rows of c are
    // zero). Shapes where the own loops run (m a multiple of 16; m ≥ 128 for ∂x) and where gemm
    // does, from buffers of dfdx's cache left full of NaN, on 1 and 2 threads.
    let mut rng = StdRng::seed_from_u64(8);
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        for (tokens, l, in_use) in [
            (5, Stacked { experts: 3, k: 7, m: 9, transposed: false }, vec![5, 0, 2]),
            (20, Stacked { experts: 4, k: 64, m: 256, transposed: false }, vec![13, 20, 1, 0]),
            (9, Stacked { experts: 2, k: 256, m: 64, transposed: false }, vec![9, 6]),
            (70, Stacked { experts: 2, k: 16, m: 128, transposed: false }, vec![70, 33]),
            (6, Stacked { experts: 1, k: 16, m: 8, transposed: false }, vec![4]),
            // one expert on two threads: its rows (and ∂W's) split between them
            (40, Stacked { experts: 1, k: 32, m: 128, transposed: false }, vec![29]),
        ] {
            let (e, k, m) = (l.experts, l.k, l.m);
            let (x, w) = (random(&mut rng, e * tokens * k, 1.0), random(&mut rng, e * k * m, 1.0));
            let (mask_m, mask_k) = (rows_in_use_mask(&in_use, tokens, m), rows_in_use_mask(&in_use, tokens, k));
            let (c, c2) = (
                masked(&random(&mut rng, e * tokens * m, 1.0), &mask_m),
                masked(&random(&mut rng, e * tokens * m, 1.0), &mask_m),
            );
            let cached = Dev::default();
            cached.enable_cache();
            for &n in [e * tokens * k, e * k * m, e * tokens * m].iter().cycle().take(3 * 8) {
                drop(cached.tensor_from_vec(vec![f32::NAN; n], (n,)));
            }
            let shape = (e, tokens, k);
            let slots = pool.install(|| {
                run_twice(&|x, w| expert_matmul_fused(x, w, l, &in_use), &cached, (&x, &w), (&c, &c2), shape)
            });
            let plain = run_twice(&|x, w| param_matmul_plain(x, w, l), &Dev::default(), (&x, &w), (&c, &c2), shape);
            assert_eq!(slots.0, masked(&slots.0, &mask_m), "y outside the rows in use {in_use:?}");
            close(&slots.0, &masked(&plain.0, &mask_m), 1e-5, "y");
            assert_eq!(slots.1, masked(&slots.1, &mask_k), "dx outside the rows in use {in_use:?}");
            close(&slots.1, &masked(&plain.1, &mask_k), 1e-5, "dx");
            close(&slots.2, &plain.2, 1e-5, "dw");
        }
    }
}

#[test]
fn expert_matmul_gradients_match_finite_differences() {
    // m = 128: ∂x and ∂W through the own loops on a CPU with AVX-512, through gemm otherwise.
    let dev = Dev::default();
    let mut rng = StdRng::seed_from_u64(9);
    let (tokens, l, in_use) = (3, Stacked { experts: 2, k: 4, m: 128, transposed: false }, [3, 2]);
    let (x, w) = (random(&mut rng, 2 * tokens * 4, 1.0), random(&mut rng, 2 * 4 * 128, 1.0));
    let c = masked(&random(&mut rng, 2 * tokens * 128, 1.0), &rows_in_use_mask(&in_use, tokens, 128));
    let (_, dx, dw) = run_matmul(|x, w, l| expert_matmul_fused(x, w, l, &[3, 2]), &dev, &x, &w, &c, l);
    let loss = |x: &[f32], w: &[f32]| -> f64 {
        let xt = dev.tensor_from_vec(x.to_vec(), (2, tokens, 4));
        let y = expert_matmul_fused(xt, &dev.tensor_from_vec(w.to_vec(), (w.len(),)), l, &in_use);
        y.as_vec().iter().zip(&c).map(|(a, b)| (*a as f64) * (*b as f64)).sum()
    };
    assert_gradients_match_finite_differences((&x, &w), (&dx, &dw), &loss);
}

#[test]
fn the_slot_loops_match_a_sum_in_f64() {
    // Every tile shape and tail of the two loops, against Σ in f64 (AVX-512 where the CPU has it,
    // the plain loops otherwise).
    use switch_model::kernels::slots;
    let mut rng = StdRng::seed_from_u64(10);
    for (rows, cols, inner) in [(1, 16, 1), (4, 64, 3), (7, 80, 16), (9, 48, 40), (5, 16, 0)] {
        let (a, b) = (random(&mut rng, rows * inner, 1.0), random(&mut rng, inner * cols, 1.0));
        let start = random(&mut rng, rows * cols, 1.0);
        for accumulate in [false, true] {
            let want: Vec<f32> = (0..rows * cols)
                .map(|o| {
                    let (r, c) = (o / cols, o % cols);
                    let sum: f64 = (0..inner).map(|p| a[r * inner + p] as f64 * b[p * cols + c] as f64).sum();
                    (sum + if accumulate { start[o] as f64 } else { 0.0 }) as f32
                })
                .collect();
            let mut got = start.clone();
            slots::broadcast_product(&mut got, (rows, cols, inner), (&a, inner, 1), &b, accumulate);
            close(&got, &want, 1e-5, "broadcast_product");
            // `a` stored transposed (row stride 1, column stride `rows`), as ∂W reads x
            let at: Vec<f32> = (0..inner * rows).map(|i| a[(i % rows) * inner + i / rows]).collect();
            let mut got = start.clone();
            slots::broadcast_product(&mut got, (rows, cols, inner), (&at, 1, rows), &b, accumulate);
            close(&got, &want, 1e-5, "broadcast_product, strided a");
            // the same product as dot products with bᵀ (cols × inner), inner padded to 16
            let padded = inner.div_ceil(16) * 16;
            let pad = |n: usize, get: &dyn Fn(usize, usize) -> f32| -> Vec<f32> {
                (0..n * padded).map(|i| if i % padded < inner { get(i / padded, i % padded) } else { 0.0 }).collect()
            };
            let (ap, bt) = (pad(rows, &|r, p| a[r * inner + p]), pad(cols, &|c, p| b[p * cols + c]));
            let mut got = start.clone();
            slots::dot_product(&mut got, (rows, cols, padded), &ap, &bt, accumulate);
            close(&got, &want, 1e-5, "dot_product");
        }
    }
}

#[test]
fn broadcast_product_keeps_its_bits_wherever_its_output_starts() {
    // Overwriting, it streams 64-byte aligned vectors and computes the columns around them apart
    // (`edge_tile`): every offset of the output from a cache line, the same bits as the plain
    // FMA chains, and nothing outside the output touched.
    use switch_model::kernels::slots;
    if !slots::available() {
        eprintln!("no AVX-512F here: this checks the plain loops, not the streaming ones");
    }
    let mut rng = StdRng::seed_from_u64(12);
    // Rows of ≥ 128 columns stream: 8, 9 and 16 vectors a row, shifted or not, in 4- and 1-row tiles.
    for (rows, cols, inner) in [(1, 16, 3), (4, 64, 20), (6, 128, 7), (4, 144, 2), (9, 256, 33), (5, 128, 0)] {
        let (a, b) = (random(&mut rng, rows * inner, 1.0), random(&mut rng, inner * cols, 1.0));
        let want: Vec<u32> = (0..rows * cols)
            .map(|o| {
                let (r, c) = (o / cols, o % cols);
                (0..inner).fold(0.0f32, |acc, p| a[r * inner + p].mul_add(b[p * cols + c], acc)).to_bits()
            })
            .collect();
        // `a` as given and stored transposed (row stride 1, column stride `rows`), as ∂W reads x
        let at: Vec<f32> = (0..inner * rows).map(|i| a[(i % rows) * inner + i / rows]).collect();
        for (a, strides) in [(&a, (inner, 1)), (&at, (1, rows))] {
            for offset in 0..16 {
                let mut buf = vec![f32::NAN; rows * cols + 32];
                let out = offset..offset + rows * cols;
                slots::broadcast_product(
                    &mut buf[out.clone()],
                    (rows, cols, inner),
                    (a, strides.0, strides.1),
                    &b,
                    false,
                );
                let got: Vec<u32> = buf[out.clone()].iter().map(|x| x.to_bits()).collect();
                assert_eq!(got, want, "{rows}×{cols}×{inner} at offset {offset}, a strides {strides:?}");
                assert!(buf[..offset].iter().chain(&buf[out.end..]).all(|x| x.is_nan()), "wrote outside");
            }
        }
    }
}

#[test]
fn broadcast_product_strided_writes_its_column_block_with_the_plain_chains() {
    // Attention's products: a head's columns of a wider output and of a wider `b` (of different
    // widths), in 8-row tiles at one vector a row (then 4-row and 1-row ones), `a` as given and
    // transposed, overwriting or adding; the bits of the plain FMA chains (then the add), and the
    // columns beside the block untouched.
    use switch_model::kernels::slots;
    let mut rng = StdRng::seed_from_u64(13);
    for (rows, cols, inner) in [(8, 16, 5), (17, 16, 64), (13, 16, 3), (6, 48, 9), (9, 32, 1)] {
        let (dst_width, b_width, at) = (cols + 32, cols + 48, 16); // the block starts at column 16
        let (a, b) = (random(&mut rng, rows * inner, 1.0), random(&mut rng, inner * b_width, 1.0));
        let a_t: Vec<f32> = (0..inner * rows).map(|i| a[(i % rows) * inner + i / rows]).collect();
        let start = random(&mut rng, rows * dst_width, 1.0);
        for accumulate in [false, true] {
            let mut want = start.clone();
            for r in 0..rows {
                for c in 0..cols {
                    let sum = (0..inner).fold(0.0f32, |acc, p| a[r * inner + p].mul_add(b[p * b_width + at + c], acc));
                    let out = &mut want[r * dst_width + at + c];
                    *out = if accumulate { *out + sum } else { sum };
                }
            }
            for (a, strides) in [(&a, (inner, 1)), (&a_t, (1, rows))] {
                let mut got = start.clone();
                let (dst, b) = ((&mut got[at..], dst_width), (&b[at..], b_width));
                slots::broadcast_product_strided(dst, (rows, cols, inner), (a, strides.0, strides.1), b, accumulate);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{rows}×{cols}×{inner}, a strides {strides:?}, accumulate {accumulate}"
                );
            }
        }
    }
}

#[test]
#[should_panic(expected = "assertion failed")]
fn broadcast_product_strided_refuses_an_output_too_short_for_its_rows() {
    // 3 rows of 16, 32 apart, need 2 · 32 + 16 = 80 floats
    let (a, b, mut dst) = (vec![1.0f32; 3 * 4], vec![1.0f32; 4 * 16], vec![0.0f32; 79]);
    switch_model::kernels::slots::broadcast_product_strided((&mut dst, 32), (3, 16, 4), (&a, 4, 1), (&b, 16), false);
}

type CrossEntropy = fn(Act<Dev, OwnedTape<f32, Dev>>, &[usize]) -> Tensor<(), f32, Dev, OwnedTape<f32, Dev>>;

/// Loss and ∂/∂logits of 3 × cross-entropy (the 3 checks that the upstream gradient is used).
fn run_ce(ce: CrossEntropy, dev: &Dev, logits: &[f32], targets: &[usize]) -> (f32, Vec<f32>) {
    run_ce_times(ce, dev, logits, targets, 3.0)
}

/// Loss and ∂/∂logits of `up` × cross-entropy.
fn run_ce_times(ce: CrossEntropy, dev: &Dev, logits: &[f32], targets: &[usize], up: f32) -> (f32, Vec<f32>) {
    let n = targets.len();
    let lt = dev.tensor_from_vec(logits.to_vec(), (n, logits.len() / n));
    let loss = ce(lt.clone().leaky_traced(), targets);
    let value = loss.as_vec()[0];
    (value, (loss * up).backward().get(&lt).as_vec())
}

#[test]
fn fused_cross_entropy_matches_the_plain_path_on_one_and_two_threads() {
    let dev = Dev::default();
    let mut rng = StdRng::seed_from_u64(7);
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        for (n, v, scale) in [(1, 1, 1.0), (3, 5, 1.0), (40, 300, 4.0), (7, 2048, 30.0)] {
            let logits = random(&mut rng, n * v, scale);
            let targets: Vec<usize> = (0..n).map(|_| rng.gen_range(0..v)).collect();
            let fused = pool.install(|| run_ce(cross_entropy_fused, &dev, &logits, &targets));
            let plain = run_ce(cross_entropy_plain, &dev, &logits, &targets);
            close(&[fused.0], &[plain.0], 1e-5, "loss");
            close(&fused.1, &plain.1, 1e-5, "d logits");
        }
    }
}

/// The fused cross-entropy's arithmetic, serially (a copy of the logits turned into the softmax in
/// place, as dfdx would zero-fill the gradient and add): loss and ∂/∂logits for upstream `up`.
fn cross_entropy_serial(logits: &[f32], targets: &[usize], up: f32) -> (f32, Vec<f32>) {
    let (n, exp) = (targets.len(), switch_model::kernels::exp);
    let v = logits.len() / n;
    let mut probs = logits.to_vec();
    let mut losses = 0f64;
    for (row, &t) in probs.chunks_mut(v).zip(targets) {
        let target = row[t];
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        row.iter_mut().for_each(|x| *x = exp(*x - max));
        let (mut lanes, chunks) = ([0f32; 8], row.chunks_exact(8));
        let rest: f32 = chunks.remainder().iter().sum();
        for c in chunks {
            lanes.iter_mut().zip(c).for_each(|(l, x)| *l += x);
        }
        let sum = lanes.iter().sum::<f32>() + rest;
        row.iter_mut().for_each(|x| *x /= sum);
        losses += (max + sum.ln() - target) as f64;
    }
    let scale = up / n as f32;
    for (row, &t) in probs.chunks_mut(v).zip(targets) {
        row.iter_mut().for_each(|p| *p = 0.0 + *p * scale);
        row[t] -= scale;
    }
    ((losses / n as f64) as f32, probs)
}

#[test]
fn fused_cross_entropy_keeps_its_serial_bits_on_one_two_and_three_threads() {
    let (dev, mut rng, pools) = (Dev::default(), StdRng::seed_from_u64(12), pools([1, 2, 3]));
    for (n, v) in [(300, 259), (5, 3), (40, 1000)] {
        let mut logits = random(&mut rng, n * v, 8.0);
        // rows whose max is a zero of either sign, and a row of −∞ but one
        logits[..v].iter_mut().for_each(|x| *x = -x.abs());
        logits[0] = -0.0;
        logits[v.min(2)] = 0.0;
        logits[v..2 * v].iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
        logits[v + 1] = 1.0;
        let mut targets: Vec<usize> = (0..n).map(|i| (i * 7 + 1) % v).collect();
        targets[1] = 1; // the one finite logit of that row: a finite loss
        for up in [3.0, -2.0] {
            // a negative upstream gradient makes −0 of the underflowed probabilities, which dfdx's
            // `0 + v` turns into +0
            let (loss, grad) = cross_entropy_serial(&logits, &targets, up);
            for pool in &pools {
                let run = || run_ce_times(cross_entropy_fused, &dev, &logits, &targets, up);
                let ((fused_loss, fused_grad), threads) = (pool.install(run), pool.current_num_threads());
                assert_eq!(fused_loss.to_bits(), loss.to_bits(), "loss, [{n}, {v}] on {threads} threads");
                assert!(
                    bits(&fused_grad) == bits(&grad),
                    "∂logits, [{n}, {v}], ×{up} on {threads} threads: not dfdx's bits"
                );
            }
        }
    }
}

#[test]
fn fused_cross_entropy_is_stable_for_large_logits_and_matches_finite_differences() {
    let dev = Dev::default();
    // softmax of [1000, 0, −1000] is [1, e^-1000, 0]: the loss of target 0 is ~0, of target 1 is 1000
    let (loss, _) = run_ce(cross_entropy_fused, &dev, &[1000.0, 0.0, -1000.0], &[1]);
    assert!((loss - 1000.0).abs() < 1e-3, "{loss}");
    let mut rng = StdRng::seed_from_u64(8);
    let (n, v) = (3, 4);
    let (logits, targets) = (random(&mut rng, n * v, 2.0), vec![0, 3, 3]);
    let (_, grad) = run_ce(cross_entropy_fused, &dev, &logits, &targets);
    let loss =
        |l: &[f32]| 3.0 * cross_entropy_fused(dev.tensor_from_vec(l.to_vec(), (n, v)), &targets).as_vec()[0] as f64;
    let eps = 1e-2f32;
    for i in 0..n * v {
        let (mut up, mut down) = (logits.clone(), logits.clone());
        up[i] += eps;
        down[i] -= eps;
        let numeric = (loss(&up) - loss(&down)) / (2.0 * eps as f64);
        assert!(
            (numeric - grad[i] as f64).abs() < 1e-3 * (1.0 + numeric.abs()),
            "d logits[{i}]: {numeric} vs {}",
            grad[i]
        );
    }
}

type Attention = fn(
    Act<Dev, OwnedTape<f32, Dev>>,
    Act<Dev, OwnedTape<f32, Dev>>,
    Act<Dev, OwnedTape<f32, Dev>>,
    Option<&PositionBias<Dev>>,
    usize,
    usize,
) -> Act<Dev, OwnedTape<f32, Dev>>;

/// One attention setting: `batch` examples, `heads` heads of `dk`, `lq` queries, `lk` keys, with
/// a relative-position bias (causal or not) when `lq == lk` and `bias` is set.
struct AttentionCase {
    batch: usize,
    heads: usize,
    dk: usize,
    lq: usize,
    lk: usize,
    bias: Option<bool>,
}

#[derive(Clone)]
struct AttentionInputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    table: Vec<f32>,
    buckets: Vec<usize>,
    c: Vec<f32>,
}

impl AttentionCase {
    const BUCKETS: usize = 5;
    fn inputs(&self, rng: &mut StdRng, scale: f32) -> AttentionInputs {
        let hd = self.heads * self.dk;
        AttentionInputs {
            q: random(rng, self.batch * self.lq * hd, scale),
            k: random(rng, self.batch * self.lk * hd, scale),
            v: random(rng, self.batch * self.lk * hd, 1.0),
            table: random(rng, Self::BUCKETS * self.heads, 2.0),
            buckets: (0..self.lq * self.lk).map(|_| rng.gen_range(0..Self::BUCKETS)).collect(),
            c: random(rng, self.batch * self.lq * hd, 1.0),
        }
    }

    /// Output and the gradients of Σ out ⊙ c: ∂q, ∂k, ∂v, ∂table.
    fn run(&self, attn: Attention, dev: &Dev, x: &AttentionInputs) -> [Vec<f32>; 5] {
        let hd = self.heads * self.dk;
        let t = |v: &[f32], rows| dev.tensor_from_vec(v.to_vec(), (rows, hd));
        let (q, k, v) = (t(&x.q, self.batch * self.lq), t(&x.k, self.batch * self.lk), t(&x.v, self.batch * self.lk));
        let table = dev.tensor_from_vec(x.table.clone(), (x.table.len(),));
        let bias = self.bias.map(|causal| PositionBias {
            table: table.clone(),
            buckets: x.buckets.clone(),
            len_q: self.lq,
            len_k: self.lk,
            causal,
        });
        let tape = q.clone().leaky_traced();
        let (qt, tape) = tape.split_tape();
        let out = attn(
            qt.put_tape(tape),
            k.clone().leaky_traced(),
            v.clone().leaky_traced(),
            bias.as_ref(),
            self.batch,
            self.heads,
        );
        let y = out.as_vec();
        let grads = weighted_sum(out, &x.c).backward();
        let dtable = if self.bias.is_some() { grads.get(&table).as_vec() } else { vec![] };
        [y, grads.get(&q).as_vec(), grads.get(&k).as_vec(), grads.get(&v).as_vec(), dtable]
    }
}

fn attention_cases() -> Vec<AttentionCase> {
    let c = |batch, heads, dk, lq, lk, bias| AttentionCase { batch, heads, dk, lq, lk, bias };
    vec![
        c(1, 1, 1, 1, 1, None),
        c(2, 3, 4, 5, 5, Some(false)),
        c(3, 2, 8, 7, 7, Some(true)),
        c(2, 4, 16, 6, 9, None),
        c(4, 4, 16, 33, 33, Some(true)),
        // heads · lq · lk above one parallel chunk of the bias gradient's sum (32768 elements)
        c(2, 4, 2, 96, 96, Some(false)),
    ]
}

#[test]
fn fused_attention_matches_the_plain_path_on_one_and_two_threads() {
    let dev = Dev::default();
    let mut rng = StdRng::seed_from_u64(9);
    let pools = pools([1, 2]);
    for case in attention_cases() {
        for scale in [1.0, 4.0] {
            let x = case.inputs(&mut rng, scale);
            let [fused, two_threads] =
                pools.each_ref().map(|pool| pool.install(|| case.run(attention_fused, &dev, &x)));
            assert_eq!(fused, two_threads, "examples in parallel keep every bit");
            let plain = case.run(attention_plain, &dev, &x);
            for (what, (f, p)) in ["out", "dq", "dk", "dv", "d table"].iter().zip(fused.iter().zip(&plain)) {
                close(f, p, 1e-4, what);
            }
            if case.bias.is_some() {
                assert!(fused[4].iter().any(|g| g.abs() > 1e-3), "the bias table gets a gradient");
            }
        }
    }
}

/// ∂q, ∂k, ∂v of Σ attn(q, k, v) ⊙ c plus a weighted sum of each of q, k and v recorded after
/// the attention: their backward runs first, so attention adds to gradients already written.
fn run_with_later_uses(case: &AttentionCase, attn: Attention, dev: &Dev, x: &AttentionInputs) -> [Vec<f32>; 3] {
    let hd = case.heads * case.dk;
    let t = |v: &[f32], rows| dev.tensor_from_vec(v.to_vec(), (rows, hd));
    let (q, k, v) = (t(&x.q, case.batch * case.lq), t(&x.k, case.batch * case.lk), t(&x.v, case.batch * case.lk));
    let (qt, tape) = q.clone().leaky_traced().split_tape();
    let (kt, tk) = k.clone().leaky_traced().split_tape();
    let (vt, tv) = v.clone().leaky_traced().split_tape();
    let out =
        attn(qt.clone().put_tape(tape), kt.clone().put_tape(tk), vt.clone().put_tape(tv), None, case.batch, case.heads);
    let (out, tape) = out.split_tape();
    let (later_q, tape) = weighted_sum(qt.put_tape(tape), &x.c).split_tape();
    let (later_k, tape) = weighted_sum(kt.put_tape(tape), &x.v).split_tape();
    let (later_v, tape) = weighted_sum(vt.put_tape(tape), &x.k).split_tape();
    let loss = weighted_sum(out.put_tape(tape), &x.c) + later_q + later_k + later_v;
    let grads = loss.backward();
    [grads.get(&q).as_vec(), grads.get(&k).as_vec(), grads.get(&v).as_vec()]
}

#[test]
fn fused_attention_adds_to_gradients_other_ops_wrote_first() {
    let dev = Dev::default();
    let mut rng = StdRng::seed_from_u64(12);
    for case in attention_cases() {
        let x = case.inputs(&mut rng, 1.0);
        let fused = run_with_later_uses(&case, attention_fused, &dev, &x);
        let plain = run_with_later_uses(&case, attention_plain, &dev, &x);
        for (what, (f, p)) in ["dq", "dk", "dv"].iter().zip(fused.iter().zip(&plain)) {
            close(f, p, 1e-4, what);
        }
    }
}

#[test]
fn fused_cross_entropy_adds_to_a_gradient_another_op_wrote_first() {
    let dev = Dev::default();
    let mut rng = StdRng::seed_from_u64(13);
    let (n, v) = (6, 9);
    let (logits, c) = (random(&mut rng, n * v, 3.0), random(&mut rng, n * v, 1.0));
    let targets: Vec<usize> = (0..n).map(|i| (i * 5) % v).collect();
    let grad = |ce: CrossEntropy| {
        let lt = dev.tensor_from_vec(logits.clone(), (n, v));
        let (l, tape) = lt.clone().leaky_traced().split_tape();
        let (loss, tape) = ce(l.clone().put_tape(tape), &targets).split_tape();
        let later = weighted_sum(l.put_tape(tape), &c); // recorded after: its backward runs first
        (later + loss * 0.5).backward().get(&lt).as_vec() // 0.5: the output's gradient is read
    };
    close(&grad(cross_entropy_fused), &grad(cross_entropy_plain), 1e-5, "d logits");
}

#[test]
fn fused_attention_gradients_match_finite_differences() {
    let dev = Dev::default();
    let mut rng = StdRng::seed_from_u64(10);
    let case = AttentionCase { batch: 2, heads: 2, dk: 3, lq: 4, lk: 4, bias: Some(true) };
    let x = case.inputs(&mut rng, 1.0);
    let [_, dq, dk, dv, dtable] = case.run(attention_fused, &dev, &x);
    let loss = |x: &AttentionInputs| -> f64 {
        let hd = case.heads * case.dk;
        let t = |v: &[f32], rows| dev.tensor_from_vec(v.to_vec(), (rows, hd));
        let table = dev.tensor_from_vec(x.table.clone(), (x.table.len(),));
        let bias = PositionBias { table, buckets: x.buckets.clone(), len_q: case.lq, len_k: case.lk, causal: true };
        let out = attention_fused(t(&x.q, 8), t(&x.k, 8), t(&x.v, 8), Some(&bias), case.batch, case.heads);
        out.as_vec().iter().zip(&x.c).map(|(a, b)| (*a as f64) * (*b as f64)).sum()
    };
    let eps = 1e-2f32;
    let check = |grad: &[f32], what: &str, field: fn(&mut AttentionInputs) -> &mut Vec<f32>| {
        for (i, &g) in grad.iter().enumerate() {
            let (mut up, mut down) = (x.clone(), x.clone());
            field(&mut up)[i] += eps;
            field(&mut down)[i] -= eps;
            let numeric = (loss(&up) - loss(&down)) / (2.0 * eps as f64);
            assert!((numeric - g as f64).abs() < 2e-3 * (1.0 + numeric.abs()), "{what}[{i}]: {numeric} vs {g}");
        }
    };
    check(&dq, "dq", |x| &mut x.q);
    check(&dk, "dk", |x| &mut x.k);
    check(&dv, "dv", |x| &mut x.v);
    check(&dtable, "d table", |x| &mut x.table);
}

/// The row kernels of the Switch layer: gather rows, combine with gates, multiply by a constant.
/// `x` `[8, 5]` goes through all three, as in a layer (dispatch, constant, combine), with rows that
/// repeat (empty expert slots all hold token 0) and dropped tokens (`None`).
#[derive(Clone, Copy)]
struct RowKernels {
    gather: fn(Act<Dev, OwnedTape<f32, Dev>>, &[usize]) -> Act<Dev, OwnedTape<f32, Dev>>,
    mul: fn(Act<Dev, OwnedTape<f32, Dev>>, &[f32]) -> Act<Dev, OwnedTape<f32, Dev>>,
    combine: fn(
        Act<Dev, OwnedTape<f32, Dev>>,
        Tensor<(usize,), f32, Dev, OwnedTape<f32, Dev>>,
        &[Option<usize>],
    ) -> Act<Dev, OwnedTape<f32, Dev>>,
}

const FUSED_ROWS: RowKernels =
    RowKernels { gather: gather_rows_fused, mul: mul_constant_fused, combine: combine_fused };
const PLAIN_ROWS: RowKernels =
    RowKernels { gather: gather_rows_plain, mul: mul_constant_plain, combine: combine_plain };

struct RowInputs {
    x: Vec<f32>,
    gate: Vec<f32>,
    noise: Vec<f32>,
    c: Vec<f32>,
}

const ROW_D: usize = 5;
const SLOT_TOKEN: [usize; 6] = [3, 0, 0, 5, 1, 7]; // slots 1, 2 empty: token 0
const TOKEN_SLOT: [Option<usize>; 8] = [Some(1), Some(4), None, Some(0), None, Some(3), None, Some(5)];

fn row_inputs(rng: &mut StdRng) -> RowInputs {
    let n = TOKEN_SLOT.len();
    RowInputs {
        x: random(rng, n * ROW_D, 1.0),
        gate: random(rng, n, 1.0),
        noise: random(rng, SLOT_TOKEN.len() * ROW_D, 2.0),
        c: random(rng, n * ROW_D, 1.0),
    }
}

/// Σ c ⊙ combine(gather(x) ⊙ noise, gate), its output and its gradients for x and gate.
fn run_rows(k: RowKernels, dev: &Dev, i: &RowInputs) -> (f64, Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = TOKEN_SLOT.len();
    let x = dev.tensor_from_vec(i.x.clone(), (n, ROW_D));
    let gate = dev.tensor_from_vec(i.gate.clone(), (n,));
    let (xt, tape) = x.clone().leaky_traced().split_tape();
    let slots = (k.mul)((k.gather)(xt.put_tape(tape), &SLOT_TOKEN), &i.noise);
    let (slots, tape) = slots.split_tape();
    let y = (k.combine)(slots.put_tape(tape), gate.clone().leaky_traced(), &TOKEN_SLOT);
    let out = y.as_vec();
    let loss = weighted_sum(y, &i.c);
    let value = loss.as_vec()[0] as f64;
    let grads = loss.backward();
    (value, out, grads.get(&x).as_vec(), grads.get(&gate).as_vec())
}

#[test]
fn fused_row_kernels_match_the_plain_path() {
    let dev = Dev::default();
    let mut rng = StdRng::seed_from_u64(21);
    for _ in 0..3 {
        let inputs = row_inputs(&mut rng);
        let (fused, plain) = (run_rows(FUSED_ROWS, &dev, &inputs), run_rows(PLAIN_ROWS, &dev, &inputs));
        close(&fused.1, &plain.1, 1e-6, "y");
        close(&fused.2, &plain.2, 1e-5, "dx");
        close(&fused.3, &plain.3, 1e-5, "dgate");
        // dropped tokens give zero rows and no gate gradient
        for (t, slot) in TOKEN_SLOT.iter().enumerate() {
            if slot.is_none() {
                assert!(fused.1[t * ROW_D..(t + 1) * ROW_D].iter().all(|&v| v == 0.0), "token {t} is dropped");
                assert_eq!(fused.3[t], 0.0, "token {t} is dropped");
            }
        }
    }
}

#[test]
fn fused_row_kernels_gradients_match_finite_differences() {
    let dev = Dev::default();
    let mut rng = StdRng::seed_from_u64(22);
    let inputs = row_inputs(&mut rng);
    let (_, _, dx, dgate) = run_rows(FUSED_ROWS, &dev, &inputs);
    let eps = 1e-2f32; // the loss is linear in x and in the gate: only rounding limits the step
    let fd = |change: &dyn Fn(&mut RowInputs, f32)| {
        let at = |h: f32| {
            let mut i = RowInputs {
                x: inputs.x.clone(),
                gate: inputs.gate.clone(),
                noise: inputs.noise.clone(),
                c: inputs.c.clone(),
            };
            change(&mut i, h);
            run_rows(FUSED_ROWS, &dev, &i).0
        };
        (at(eps) - at(-eps)) / (2.0 * eps as f64)
    };
    for (j, &analytic) in dx.iter().enumerate() {
        let numeric = fd(&|i, h| i.x[j] += h);
        assert!((numeric - analytic as f64).abs() < 1e-3 * (1.0 + numeric.abs()), "dx[{j}]: {numeric} vs {analytic}");
    }
    for (t, &analytic) in dgate.iter().enumerate() {
        let numeric = fd(&|i, h| i.gate[t] += h);
        assert!(
            (numeric - analytic as f64).abs() < 1e-3 * (1.0 + numeric.abs()),
            "dgate[{t}]: {numeric} vs {analytic}"
        );
    }
    // token 0 reaches the output through slot 1 only (slots 1 and 2 hold it; slot 2 is never read)
    assert!(dx[..ROW_D].iter().any(|&v| v != 0.0));
}

/// The router's head, fused or plain: softmax, z-loss, balance loss's Σ p ⊙ w.
#[derive(Clone, Copy)]
struct RouterKernels {
    softmax: fn(Act<Dev, OwnedTape<f32, Dev>>) -> Act<Dev, OwnedTape<f32, Dev>>,
    z: fn(Act<Dev, OwnedTape<f32, Dev>>) -> Tensor<(), f32, Dev, OwnedTape<f32, Dev>>,
    dot: fn(Act<Dev, OwnedTape<f32, Dev>>, &[f32]) -> Tensor<(), f32, Dev, OwnedTape<f32, Dev>>,
}

const FUSED_ROUTER: RouterKernels =
    RouterKernels { softmax: softmax_rows_fused, z: logsumexp_sq_mean_fused, dot: dot_constant_fused };
const PLAIN_ROUTER: RouterKernels =
    RouterKernels { softmax: softmax_rows_plain, z: logsumexp_sq_mean_plain, dot: dot_constant_plain };

/// 0.3·z(x) + Σ w ⊙ softmax(x) + Σ c ⊙ softmax(x) as the router uses them (the logits feed the
/// z-loss and the softmax; the probabilities feed the balance loss and the gates): the loss,
/// the probabilities and ∂loss/∂x.
fn run_router(k: RouterKernels, dev: &Dev, x: &[f32], w: &[f32], c: &[f32], e: usize) -> (f64, Vec<f32>, Vec<f32>) {
    let xt = dev.tensor_from_vec(x.to_vec(), (x.len() / e, e));
    let (logits, tape) = xt.clone().leaky_traced().split_tape();
    let z = (k.z)(logits.clone().put_tape(tape)) * 0.3;
    let (probs, tape) = (k.softmax)(logits.retaped()).split_tape();
    let out = probs.as_vec();
    let balance = (k.dot)(probs.clone().put_tape(tape), w);
    let loss = z + balance + weighted_sum(probs.retaped::<OwnedTape<f32, Dev>>(), c);
    let value = loss.as_vec()[0] as f64;
    (value, out, loss.backward().get(&xt).as_vec())
}

#[test]
fn fused_router_kernels_match_the_plain_path() {
    let dev = Dev::default();
    let mut rng = StdRng::seed_from_u64(31);
    for (n, e, scale) in [(1, 1, 1.0), (3, 2, 1.0), (17, 64, 4.0), (9, 128, 30.0)] {
        let x = random(&mut rng, n * e, scale);
        let (w, c) = (random(&mut rng, n * e, 1.0), random(&mut rng, n * e, 1.0));
        let fused = run_router(FUSED_ROUTER, &dev, &x, &w, &c, e);
        let plain = run_router(PLAIN_ROUTER, &dev, &x, &w, &c, e);
        assert!((fused.0 - plain.0).abs() < 1e-5 * (1.0 + plain.0.abs()), "loss {} vs {}", fused.0, plain.0);
        close(&fused.1, &plain.1, 1e-6, "p");
        close(&fused.2, &plain.2, 1e-5, "dx");
    }
}

#[test]
fn fused_router_kernels_gradients_match_finite_differences() {
    let dev = Dev::default();
    let mut rng = StdRng::seed_from_u64(32);
    let (n, e) = (5, 8);
    let x = random(&mut rng, n * e, 2.0);
    let (w, c) = (random(&mut rng, n * e, 1.0), random(&mut rng, n * e, 1.0));
    let (_, _, dx) = run_router(FUSED_ROUTER, &dev, &x, &w, &c, e);
    let eps = 1e-2f32;
    for (j, &analytic) in dx.iter().enumerate() {
        let at = |h: f32| {
            let mut x = x.clone();
            x[j] += h;
            run_router(FUSED_ROUTER, &dev, &x, &w, &c, e).0
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
        assert!((numeric - analytic as f64).abs() < 2e-3 * (1.0 + numeric.abs()), "dx[{j}]: {numeric} vs {analytic}");
    }
}

#[test]
fn vectorised_exp_is_within_two_ulp_and_zero_far_below() {
    use switch_model::kernels::exp;
    let mut worst = 0f64;
    for i in 0..=2_000_000 {
        let x = -87.0 + 175.0 * i as f32 / 2_000_000.0;
        let exact = (x as f64).exp();
        let ulp = f32::EPSILON as f64 * 2f64.powi((exact.log2()).floor() as i32);
        worst = worst.max((exp(x) as f64 - exact).abs() / ulp);
    }
    assert!(worst <= 2.0, "worst error {worst} ulp");
    assert_eq!(exp(0.0), 1.0);
    assert_eq!((exp(-87.4), exp(-1e9), exp(f32::NEG_INFINITY)), (0.0, 0.0, 0.0));
    assert!(exp(88.0).is_finite() && exp(88.0) > 1e38);
}

/// Σ y ⊙ c and, with `later`, plus Σ input ⊙ c2 recorded after y: that op's backward runs first,
/// so the op that made y is then the second writer of `input`'s gradient.
fn loss_with_later_use(
    y: Act<Dev, OwnedTape<f32, Dev>>,
    input: Act<Dev, NoneTape>,
    (c, c2): (&[f32], &[f32]),
    later: bool,
) -> Tensor<(), f32, Dev, OwnedTape<f32, Dev>> {
    if !later {
        return weighted_sum(y, c);
    }
    let (y, tape) = y.split_tape();
    let (extra, tape) = weighted_sum(input.put_tape(tape), c2).split_tape();
    weighted_sum(y.put_tape(tape), c) + extra
}

type ResidualAdd = fn(Act<Dev, OwnedTape<f32, Dev>>, Act<Dev, NoneTape>) -> Act<Dev, OwnedTape<f32, Dev>>;

/// The residual add as a block uses it: `res` also feeds a sublayer (here `x = res ⊙ 2`) whose
/// backward runs after the add's, and with `later` its output is also read by an op recorded after
/// it, so the add is then the second writer of `x`'s gradient. Output, ∂res.
fn run_residual(
    add: ResidualAdd,
    dev: &Dev,
    (res, c, c2): (&[f32], &[f32], &[f32]),
    n: usize,
    later: bool,
) -> (Vec<f32>, Vec<f32>) {
    let rt = dev.tensor_from_vec(res.to_vec(), (n, res.len() / n));
    let (r, tape) = rt.clone().leaky_traced().split_tape();
    let x = r.clone().put_tape(tape) * 2.0;
    let (x, tape) = x.split_tape();
    let x_again = x.clone();
    let y = add(x.put_tape(tape), r);
    let out = y.as_vec();
    (out, loss_with_later_use(y, x_again, (c, c2), later).backward().get(&rt).as_vec())
}

#[test]
fn fused_residual_add_matches_the_plain_path_on_one_and_two_threads() {
    let dev = Dev::default();
    let mut rng = StdRng::seed_from_u64(14);
    let pools = pools([1, 2]);
    for (n, d) in [(1, 1), (3, 5), (300, 256)] {
        let (res, c, c2) = (random(&mut rng, n * d, 2.0), random(&mut rng, n * d, 1.0), random(&mut rng, n * d, 1.0));
        for later in [false, true] {
            let [one, two] = pools
                .each_ref()
                .map(|p| p.install(|| run_residual(residual_add_fused, &dev, (&res, &c, &c2), n, later)));
            assert_eq!(one, two, "elementwise: the same bits on any number of threads");
            let plain = run_residual(residual_add_plain, &dev, (&res, &c, &c2), n, later);
            assert_eq!((bits(&one.0), bits(&one.1)), (bits(&plain.0), bits(&plain.1)), "dfdx's bits (later: {later})");
        }
    }
}

type Relu = fn(Act<Dev, OwnedTape<f32, Dev>>) -> Act<Dev, OwnedTape<f32, Dev>>;

/// Output and ∂x of Σ relu(x) ⊙ c, and with `later` plus Σ x ⊙ c2 recorded after the ReLU (so it
/// adds to a gradient another op wrote first). x holds exact zeros and negative zeros too.
fn run_relu(
    relu: Relu,
    dev: &Dev,
    (x, c, c2): (&[f32], &[f32], &[f32]),
    n: usize,
    later: bool,
) -> (Vec<f32>, Vec<f32>) {
    let xt = dev.tensor_from_vec(x.to_vec(), (n, x.len() / n));
    let (xs, tape) = xt.clone().leaky_traced().split_tape();
    let y = relu(xs.clone().put_tape(tape));
    let out = y.as_vec();
    (out, loss_with_later_use(y, xs, (c, c2), later).backward().get(&xt).as_vec())
}

#[test]
fn fused_relu_matches_dfdx_bit_for_bit_on_one_and_two_threads() {
    let dev = Dev::default();
    let mut rng = StdRng::seed_from_u64(15);
    let pools = pools([1, 2]);
    for (n, d) in [(1, 4), (3, 5), (300, 256)] {
        let mut x = random(&mut rng, n * d, 2.0);
        x[0] = 0.0;
        x[1] = -0.0;
        let (c, c2) = (random(&mut rng, n * d, 1.0), random(&mut rng, n * d, 1.0));
        for later in [false, true] {
            let [one, two] =
                pools.each_ref().map(|p| p.install(|| run_relu(relu_fused, &dev, (&x, &c, &c2), n, later)));
            assert_eq!(one, two, "elementwise: the same bits on any number of threads");
            let plain = run_relu(relu_plain, &dev, (&x, &c, &c2), n, later);
            assert_eq!(
                (bits(&one.0), bits(&one.1)),
                (bits(&plain.0), bits(&plain.1)),
                "dfdx's bits (later use: {later})"
            );
        }
    }
}
