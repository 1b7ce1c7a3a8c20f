//! The few runtime-sized building blocks the model needs: parameters, init, linear, RMSNorm,
//! dropout and the (stacked) expert feed-forward network.
//!
//! Every parameter is a flat `Tensor<(usize,), f32, D>`: modules reshape it at use, which in dfdx
//! keeps the tensor's id, so gradients land on the flat parameter and one optimizer, one
//! checkpoint format and one clipping rule serve every layer.
//!
//! ```
//! use switch_model::{kernels::KernelMode, nn::Linear};
//! use dfdx::prelude::*;
//! let dev: Cpu = Default::default();
//! let lin = Linear::from_rows(&dev, 2, 3, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
//! let x = dev.tensor_from_vec(vec![1.0f32, 1.0], (1usize, 2usize));
//! let y = lin.forward(x, KernelMode::Fused);
//! assert_eq!(y.as_vec(), vec![5.0, 7.0, 9.0]);
//! ```
use crate::kernels::{Act3, KernelMode, Kernels, Stacked};
pub use crate::tensor::{device_tensor, Act, Param, Tp};
use dfdx::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// What a parameter is for. The optimizer (matrix layout), the router's learning rate and the
/// router probe read this, never the parameter's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Embedding,
    PositionBias,
    Norm,
    Attention,
    /// A dense model's feed-forward weights.
    Ffn,
    /// A sparse layer's expert weights, `[experts, rows, cols]`.
    Expert,
    Router,
}

/// One trainable parameter as its module creates it: the name checkpoints and reports use, its
/// role, and its `[batch, rows, cols]` layout (row-major matrices, experts stacked in `batch`,
/// vectors as `[1, 1, n]`).
pub struct ModelParam<'a, D: Device<f32>> {
    pub name: String,
    pub role: Role,
    pub shape: [usize; 3],
    pub param: &'a mut Param<D>,
}

impl<'a, D: Device<f32>> ModelParam<'a, D> {
    /// Checks that `shape` holds exactly the parameter's floats.
    pub fn new(name: impl Into<String>, role: Role, shape: [usize; 3], param: &'a mut Param<D>) -> Self {
        let name = name.into();
        assert_eq!(shape.iter().product::<usize>(), param.shape().0, "parameter {name}: layout {shape:?}");
        Self { name, role, shape, param }
    }
    /// The same parameter named under `prefix` (`prefix.name`).
    pub fn under(self, prefix: &str) -> Self {
        Self { name: format!("{prefix}.{}", self.name), ..self }
    }
}

/// Per-forward state: training mode, the randomness of this step and the kernels to run.
pub struct Ctx {
    pub train: bool,
    pub rng: StdRng,
    pub kernels: KernelMode,
}

impl Ctx {
    /// A training pass (dropout, jitter) drawing from `seed`, with the default kernels.
    pub fn train(seed: u64) -> Self {
        Self { train: true, rng: StdRng::seed_from_u64(seed), kernels: KernelMode::default() }
    }
    /// An evaluation pass with the default kernels.
    pub fn eval() -> Self {
        Self { train: false, rng: StdRng::seed_from_u64(0), kernels: KernelMode::default() }
    }
    /// This pass with `kernels` instead.
    pub fn with_kernels(self, kernels: KernelMode) -> Self {
        Self { kernels, ..self }
    }
}

/// Truncated normal N(0, σ²) with σ = √(scale / fan_in); draws beyond 2σ are resampled (the
/// paper's footnote 6).
pub fn truncated_normal<D: Device<f32>>(dev: &D, rng: &mut StdRng, n: usize, scale: f64, fan_in: usize) -> Param<D> {
    let std = (scale / fan_in as f64).sqrt();
    let v: Vec<f32> = (0..n)
        .map(|_| loop {
            // Box–Muller
            let (u1, u2): (f64, f64) = (rng.gen::<f64>().max(f64::MIN_POSITIVE), rng.gen());
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            if z.abs() <= 2.0 {
                break (z * std) as f32;
            }
        })
        .collect();
    dev.tensor_from_vec(v, (n,))
}

/// Multiplies by a fresh mask of 0 or 1/(1−rate) in training; identity otherwise.
pub fn dropout<S: Shape, D: Kernels, T: Tp<D>>(
    x: Tensor<S, f32, D, T>,
    rate: f64,
    ctx: &mut Ctx,
) -> Tensor<S, f32, D, T> {
    if !ctx.train || rate == 0.0 {
        return x;
    }
    let keep = 1.0 / (1.0 - rate) as f32;
    let mask: Vec<f32> =
        (0..x.shape().num_elements()).map(|_| if ctx.rng.gen::<f64>() < rate { 0.0 } else { keep }).collect();
    D::mul_constant(ctx.kernels, x, &mask)
}

/// A linear map without bias; the weight is stored `[d_in, d_out]`.
pub struct Linear<D: Device<f32>> {
    pub weight: Param<D>,
    pub d_in: usize,
    pub d_out: usize,
}

impl<D: Device<f32>> Linear<D> {
    pub fn new(dev: &D, rng: &mut StdRng, d_in: usize, d_out: usize, init_scale: f64) -> Self {
        Self { weight: truncated_normal(dev, rng, d_in * d_out, init_scale, d_in), d_in, d_out }
    }
    /// The weight as parameter `name` with `role`, laid out `[1, d_in, d_out]`.
    pub fn param(&mut self, name: &str, role: Role) -> ModelParam<'_, D> {
        let shape = [1, self.d_in, self.d_out];
        ModelParam::new(name, role, shape, &mut self.weight)
    }
    /// A layer with the given row-major `[d_in, d_out]` weights (for tests and examples).
    pub fn from_rows(dev: &D, d_in: usize, d_out: usize, rows: &[f32]) -> Self {
        Self { weight: dev.tensor_from_vec(rows.to_vec(), (d_in * d_out,)), d_in, d_out }
    }
    /// `x`: `[tokens, d_in]` → `[tokens, d_out]` (the device's kernel, see [`crate::kernels`]).
    pub fn forward<T: Tp<D>>(&self, x: Act<D, T>, kernels: KernelMode) -> Act<D, T>
    where
        D: Kernels,
    {
        let n = x.shape().0;
        let layout = Stacked::matrix(self.d_in, self.d_out);
        D::param_matmul(kernels, x.reshape_like(&(1, n, self.d_in)), &self.weight, layout)
            .reshape_like(&(n, self.d_out))
    }
}

/// T5's RMSNorm: x · w / √(mean(x²) + ε), no bias, no mean subtraction (the device's kernel:
/// fused on the CPU, see [`crate::kernels`]).
pub struct RmsNorm<D: Device<f32>> {
    pub weight: Param<D>,
}

impl<D: Device<f32>> RmsNorm<D> {
    pub fn new(dev: &D, d: usize) -> Self {
        Self { weight: dev.ones_like(&(d,)) }
    }
    /// The weight as parameter `name`, laid out `[1, 1, d]`.
    pub fn param(&mut self, name: &str) -> ModelParam<'_, D> {
        let d = self.weight.shape().0;
        ModelParam::new(name, Role::Norm, [1, 1, d], &mut self.weight)
    }
    pub fn forward<T: Tp<D>>(&self, x: Act<D, T>, kernels: KernelMode) -> Act<D, T>
    where
        D: Kernels,
    {
        D::rms_norm(kernels, x, &self.weight)
    }
}

/// `E` feed-forward networks with stacked weights `[E, d_model, d_ff]` and `[E, d_ff, d_model]`,
/// run together as one batched matmul on `[E, capacity, d_model]`. The dense T5 feed-forward
/// layer is the one-expert case.
pub struct ExpertFfn<D: Device<f32>> {
    pub w_in: Param<D>,
    /// GEGLU's linear branch; `None` for ReLU.
    pub w_gate: Option<Param<D>>,
    pub w_out: Param<D>,
    pub num_experts: usize,
    pub d_model: usize,
    pub d_ff: usize,
}

impl<D: Device<f32>> ExpertFfn<D> {
    pub fn new(dev: &D, rng: &mut StdRng, cfg: &crate::ModelConfig, num_experts: usize) -> Self {
        let (d, f, s) = (cfg.d_model, cfg.d_ff, cfg.init_scale);
        let w_in = truncated_normal(dev, rng, num_experts * d * f, s, d);
        let w_gate =
            (cfg.activation == crate::Activation::Geglu).then(|| truncated_normal(dev, rng, num_experts * d * f, s, d));
        let w_out = truncated_normal(dev, rng, num_experts * f * d, s, f);
        Self { w_in, w_gate, w_out, num_experts, d_model: d, d_ff: f }
    }

    /// `x`: `[E, tokens, d_model]` → `[E, tokens, d_model]`. With `rows_in_use` (expert slots), the
    /// fused kernels multiply only each expert's first `rows_in_use[i]` rows and zero the rest
    /// ([`crate::kernels::expert_matmul_fused`]).
    pub fn forward<T: Tp<D>>(
        &self,
        x: Act3<D, T>,
        rows_in_use: Option<&[usize]>,
        dropout_rate: f64,
        ctx: &mut Ctx,
    ) -> Act3<D, T>
    where
        D: Kernels,
    {
        let (e, d, f, k) = (self.num_experts, self.d_model, self.d_ff, ctx.kernels);
        let up = Stacked { experts: e, k: d, m: f, transposed: false };
        let down = Stacked { experts: e, k: f, m: d, transposed: false };
        let product = |x: Act3<D, T>, w: &Param<D>, layout: Stacked| match rows_in_use {
            None => D::param_matmul(k, x, w, layout),
            Some(rows) => D::expert_matmul(k, x, w, layout, rows),
        };
        let hidden = match &self.w_gate {
            None => D::relu(k, product(x, &self.w_in, up)),
            Some(w_gate) => {
                let (x, tape) = x.split_tape();
                let gelu = product(x.clone().put_tape(tape), &self.w_in, up).fast_gelu();
                gelu * product(x.retaped::<T>(), w_gate, up)
            }
        };
        let hidden = dropout(hidden, dropout_rate, ctx);
        product(hidden, &self.w_out, down)
    }

    /// `w_in` `[E, d, f]`, `w_out` `[E, f, d]` and GEGLU's `w_gate` `[E, d, f]`, as `role`
    /// ([`Role::Ffn`] for a dense layer, [`Role::Expert`] in a sparse one).
    pub fn params(&mut self, role: Role) -> Vec<ModelParam<'_, D>> {
        let (e, d, f) = (self.num_experts, self.d_model, self.d_ff);
        let mut v = vec![
            ModelParam::new("w_in", role, [e, d, f], &mut self.w_in),
            ModelParam::new("w_out", role, [e, f, d], &mut self.w_out),
        ];
        v.extend(self.w_gate.iter_mut().map(|w| ModelParam::new("w_gate", role, [e, d, f], w)));
        v
    }
}
