//! Each fused kernel against the plain dfdx path it replaces (outputs and gradients) and against
//! central finite differences.
use dfdx::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use switch_model::kernels::{rms_norm_fused, rms_norm_plain};
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
        let fused = run(|x, w| rms_norm_fused(x, w), &dev, &x, &w, &c, d);
        let plain = run(|x, w| rms_norm_plain(x, w), &dev, &x, &w, &c, d);
        close(&fused.0, &plain.0, 1e-5, "y");
        close(&fused.1, &plain.1, 1e-4, "dx");
        close(&fused.2, &plain.2, 1e-4, "dw");
    }
}

#[test]
fn fused_rms_norm_gradients_match_finite_differences() {
    let dev = Dev::default();
    let mut rng = StdRng::seed_from_u64(2);
    let (n, d) = (3, 5);
    let (x, w, c) = (random(&mut rng, n * d, 1.0), random(&mut rng, d, 2.0), random(&mut rng, n * d, 1.0));
    let (_, dx, dw) = run(|x, w| rms_norm_fused(x, w), &dev, &x, &w, &c, d);
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
    for i in 0..n * d {
        let numeric = fd(&x, i, &|x| loss(x, &w));
        assert!((numeric - dx[i] as f64).abs() < 2e-3 * (1.0 + numeric.abs()), "dx[{i}]: {numeric} vs {}", dx[i]);
    }
    for j in 0..d {
        let numeric = fd(&w, j, &|w| loss(&x, w));
        assert!((numeric - dw[j] as f64).abs() < 2e-3 * (1.0 + numeric.abs()), "dw[{j}]: {numeric} vs {}", dw[j]);
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
    let (fused, plain) = (twice(|x, w| rms_norm_fused(x, w)), twice(|x, w| rms_norm_plain(x, w)));
    close(&fused.0, &plain.0, 1e-4, "dx");
    close(&fused.1, &plain.1, 1e-4, "dw");
}
