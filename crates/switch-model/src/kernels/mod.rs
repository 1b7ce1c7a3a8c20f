//! Fused kernels: one pass forward and one backward where the plain dfdx composition makes a
//! fresh buffer per elementary op. Each is a dfdx op — the forward runs on the host and
//! registers its backward with `Tape::add_backward_op`, accumulating into the gradients of its
//! inputs and parameters by tensor id — and each is tested against the plain path (outputs and
//! gradients) and against finite differences.
//!
//! [`Kernels`] picks the implementation per device and [`KernelMode`]: the CPU runs the fused
//! ones unless a forward pass asks for [`KernelMode::Plain`] (its `Ctx`, from the run's
//! `train.kernels`), the router's too under [`KernelMode::FusedRouter`] and [`KernelMode::FusedSlots`]
//! (the default, whose experts also multiply only their filled slots); any other device runs
//! the plain dfdx ops (the trait's default methods).
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
use crate::tensor::{Act, Param, Tp};
use crate::wide;
use dfdx::prelude::*;
use rayon::prelude::*;

/// In a kernel's backward pass: the gradient of `$input` to add into (allocated if this is its
/// first) and that of the kernel's `$output` to read, both in place.
macro_rules! input_and_output_grads {
    ($grads:expr, $input:expr, $output:expr) => {{
        $grads.get_or_alloc_mut($input)?;
        $grads.get_or_alloc_mut($output)?;
        $grads.mut_and_ref($input, $output)
    }};
}

/// Like `input_and_output_grads!`, for a kernel that writes every element of `$input`'s
/// gradient: `(gradient, accumulate, output gradient)`, where `accumulate = false` means this
/// kernel is the gradient's first writer and must overwrite its stale contents (see the patched
/// dfdx's `Gradients::mut_for_overwrite_and_ref`: no zero fill, no read of the zeros).
macro_rules! input_for_overwrite_and_output_grads {
    ($grads:expr, $input:expr, $output:expr) => {{
        $grads.get_or_alloc_mut($output)?;
        let (grad, accumulate, output) = $grads.mut_for_overwrite_and_ref($input, $output)?;
        let grad = if accumulate { &mut grad[..] } else { crate::kernels::to_overwrite(grad) };
        (grad, accumulate, output)
    }};
}

mod attention;
mod norm;
pub mod product_clock;
mod router;
mod rows;
pub mod slots;
pub use attention::{attention_fused, attention_plain, PositionBias};
pub use norm::{rms_norm_fused, rms_norm_plain};
pub use router::{
    dot_constant_fused, dot_constant_plain, logsumexp_sq_mean_fused, logsumexp_sq_mean_plain, softmax_rows_fused,
    softmax_rows_plain,
};
pub use rows::{
    combine_fused, combine_plain, gather_rows_fused, gather_rows_plain, mul_constant_fused, mul_constant_plain,
    relu_fused, relu_plain, residual_add_fused, residual_add_plain,
};

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

/// Which kernels a forward pass runs on the CPU. They differ in floating-point order (the same
/// model to about 1e-6), so a run's config names its mode and its run id tells them apart.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelMode {
    /// This module's fused kernels, every expert slot through gemm: the default until 2026-12-06,
    /// which the committed reports made before then pin (their grids set it).
    Fused,
    /// The plain dfdx compositions: the reference the fused kernels are tested against.
    Plain,
    /// The fused kernels, and the router's softmax, z-loss and balance loss fused as well
    /// (`router`'s kernels).
    FusedRouter,
    /// `FusedRouter`, and the experts multiply only their capacity slots up to the last that
    /// holds a token, with the engine's own loops for ∂x and ∂W where they beat gemm
    /// ([`expert_matmul_fused`]). A capacity factor then costs memory more than time, as in HF's
    /// Switch and unlike Mesh TensorFlow's, which computes every slot. The default: the same
    /// quality as `Fused` (paired seeds, `results/slot-kernels`) and faster at many experts.
    #[default]
    FusedSlots,
}

/// The engine's kernels for device `Self`. The defaults are the plain dfdx compositions.
pub trait Kernels: Device<f32> {
    /// An index tensor holding `values`. On the CPU its buffer comes from the device's allocator,
    /// for the reason given at [`crate::tensor::device_tensor`].
    fn indices(&self, values: &[usize]) -> Tensor<(usize,), usize, Self> {
        self.tensor_from_vec(values.to_vec(), (values.len(),))
    }
    /// `t`'s values on the host, row-major: a copy, or on the CPU its own buffer in place (the
    /// router's probabilities are read there every step to route the tokens).
    fn host_values<S: Shape, T>(t: &Tensor<S, f32, Self, T>) -> std::borrow::Cow<'_, [f32]> {
        std::borrow::Cow::Owned(t.as_vec())
    }
    /// `x · w / √(mean(x²) + ε)` over the last axis. `x`: `[tokens, d]`, `w`: `[d]`.
    fn rms_norm<T: Tp<Self>>(_mode: KernelMode, x: Act<Self, T>, w: &Param<Self>) -> Act<Self, T> {
        rms_norm_plain(x, w)
    }
    /// `x · W` for each of `w`'s stacked matrices: `x` `[E, c, k]` → `[E, c, m]`.
    fn param_matmul<T: Tp<Self>>(
        _mode: KernelMode,
        x: Act3<Self, T>,
        w: &Param<Self>,
        layout: Stacked,
    ) -> Act3<Self, T> {
        param_matmul_plain(x, w, layout)
    }
    /// [`Kernels::param_matmul`] on expert slots of which expert i uses only its first
    /// `rows_in_use[i]` rows (see [`expert_matmul_fused`]); the plain composition multiplies
    /// every slot.
    fn expert_matmul<T: Tp<Self>>(
        _mode: KernelMode,
        x: Act3<Self, T>,
        w: &Param<Self>,
        layout: Stacked,
        _rows_in_use: &[usize],
    ) -> Act3<Self, T> {
        param_matmul_plain(x, w, layout)
    }
    /// Mean over tokens of `−log softmax(logits)[target]`: `logits` `[tokens, vocab]`.
    fn cross_entropy<T: Tp<Self>>(
        _mode: KernelMode,
        logits: Act<Self, T>,
        targets: &[usize],
    ) -> Tensor<(), f32, Self, T> {
        cross_entropy_plain(logits, targets)
    }
    /// softmax(q·kᵀ + bias)·v for each example and head, without 1/√d_kv (T5 folds it into the
    /// query's init). `q`: `[batch·Lq, heads·d_kv]`, `k`, `v`: `[batch·Lk, heads·d_kv]`, heads
    /// side by side as the projections give them → `[batch·Lq, heads·d_kv]`.
    fn attention<T: Tp<Self>>(
        _mode: KernelMode,
        q: Act<Self, T>,
        k: Act<Self, T>,
        v: Act<Self, T>,
        bias: Option<&PositionBias<Self>>,
        batch: usize,
        heads: usize,
    ) -> Act<Self, T> {
        attention_plain(q, k, v, bias, batch, heads)
    }
    /// Row i of the output is row `rows[i]` of `x` `[n, d]` → `[rows.len(), d]` (tokens into
    /// expert slots; an embedding lookup).
    fn gather_rows<T: Tp<Self>>(_mode: KernelMode, x: Act<Self, T>, rows: &[usize]) -> Act<Self, T> {
        gather_rows_plain(x, rows)
    }
    /// Each token's expert output times its gate: `y[t] = gate[t] · x[slots[t]]`, zero where
    /// `slots[t]` is `None` (a dropped token). `x` `[slots, d]`, `gate` `[tokens]` → `[tokens, d]`.
    fn combine<T: Tp<Self>>(
        _mode: KernelMode,
        x: Act<Self, T>,
        gate: Tensor<(usize,), f32, Self, T>,
        slots: &[Option<usize>],
    ) -> Act<Self, T> {
        combine_plain(x, gate, slots)
    }
    /// `x ⊙ c` for a constant `c` of `x`'s shape (jitter noise, a dropout mask).
    fn mul_constant<S: Shape, T: Tp<Self>>(
        _mode: KernelMode,
        x: Tensor<S, f32, Self, T>,
        c: &[f32],
    ) -> Tensor<S, f32, Self, T> {
        mul_constant_plain(x, c)
    }
    /// `x + res`: the residual connection around a sublayer (`res` carries no tape: its
    /// gradient is recorded through `x`'s).
    fn residual_add<T: Tp<Self>>(_mode: KernelMode, x: Act<Self, T>, res: Act<Self, NoneTape>) -> Act<Self, T> {
        residual_add_plain(x, res)
    }
    /// `max(x, 0)`: the feed-forward layers' activation.
    fn relu<S: Shape, T: Tp<Self>>(_mode: KernelMode, x: Tensor<S, f32, Self, T>) -> Tensor<S, f32, Self, T> {
        relu_plain(x)
    }
    /// softmax over the last axis: `x` `[tokens, experts]` (the router's probabilities).
    fn softmax_rows<T: Tp<Self>>(_mode: KernelMode, x: Act<Self, T>) -> Act<Self, T> {
        softmax_rows_plain(x)
    }
    /// Mean over the rows of `x` `[tokens, experts]` of logsumexp(row)² (the router z-loss).
    fn logsumexp_sq_mean<T: Tp<Self>>(_mode: KernelMode, x: Act<Self, T>) -> Tensor<(), f32, Self, T> {
        logsumexp_sq_mean_plain(x)
    }
    /// Σ x ⊙ c for a constant `c` of `x`'s shape (the load-balancing loss).
    fn dot_constant<T: Tp<Self>>(_mode: KernelMode, x: Act<Self, T>, c: &[f32]) -> Tensor<(), f32, Self, T> {
        dot_constant_plain(x, c)
    }
}

impl KernelMode {
    /// Whether the layers' kernels (norm, products, attention, rows, cross-entropy) run fused.
    pub fn fuses_layers(self) -> bool {
        self != KernelMode::Plain
    }
    /// Whether the router's softmax and losses run fused.
    pub fn fuses_router(self) -> bool {
        matches!(self, KernelMode::FusedRouter | KernelMode::FusedSlots)
    }
}

/// `fused` when `$use_fused`, `plain` otherwise.
macro_rules! pick {
    ($use_fused:expr, $plain:expr, $fused:expr) => {
        if $use_fused {
            $fused
        } else {
            $plain
        }
    };
}

impl Kernels for Cpu {
    fn indices(&self, values: &[usize]) -> Tensor<(usize,), usize, Self> {
        let mut t = self.zeros_like(&(values.len(),));
        t.copy_from(values);
        t
    }
    fn host_values<S: Shape, T>(t: &Tensor<S, f32, Self, T>) -> std::borrow::Cow<'_, [f32]> {
        std::borrow::Cow::Borrowed(data(t))
    }
    fn rms_norm<T: Tp<Self>>(mode: KernelMode, x: Act<Self, T>, w: &Param<Self>) -> Act<Self, T> {
        pick!(mode.fuses_layers(), rms_norm_plain(x, w), rms_norm_fused(x, w))
    }
    fn param_matmul<T: Tp<Self>>(
        mode: KernelMode,
        x: Act3<Self, T>,
        w: &Param<Self>,
        layout: Stacked,
    ) -> Act3<Self, T> {
        pick!(mode.fuses_layers(), param_matmul_plain(x, w, layout), param_matmul_fused(x, w, layout))
    }
    fn expert_matmul<T: Tp<Self>>(
        mode: KernelMode,
        x: Act3<Self, T>,
        w: &Param<Self>,
        layout: Stacked,
        rows_in_use: &[usize],
    ) -> Act3<Self, T> {
        match mode {
            KernelMode::Plain => param_matmul_plain(x, w, layout),
            KernelMode::Fused | KernelMode::FusedRouter => param_matmul_fused(x, w, layout),
            KernelMode::FusedSlots => expert_matmul_fused(x, w, layout, rows_in_use),
        }
    }
    fn cross_entropy<T: Tp<Self>>(
        mode: KernelMode,
        logits: Act<Self, T>,
        targets: &[usize],
    ) -> Tensor<(), f32, Self, T> {
        pick!(mode.fuses_layers(), cross_entropy_plain(logits, targets), cross_entropy_fused(logits, targets))
    }
    fn attention<T: Tp<Self>>(
        mode: KernelMode,
        q: Act<Self, T>,
        k: Act<Self, T>,
        v: Act<Self, T>,
        bias: Option<&PositionBias<Self>>,
        batch: usize,
        heads: usize,
    ) -> Act<Self, T> {
        pick!(
            mode.fuses_layers(),
            attention_plain(q, k, v, bias, batch, heads),
            attention_fused(q, k, v, bias, batch, heads)
        )
    }
    fn gather_rows<T: Tp<Self>>(mode: KernelMode, x: Act<Self, T>, rows: &[usize]) -> Act<Self, T> {
        pick!(mode.fuses_layers(), gather_rows_plain(x, rows), gather_rows_fused(x, rows))
    }
    fn combine<T: Tp<Self>>(
        mode: KernelMode,
        x: Act<Self, T>,
        gate: Tensor<(usize,), f32, Self, T>,
        slots: &[Option<usize>],
    ) -> Act<Self, T> {
        pick!(mode.fuses_layers(), combine_plain(x, gate, slots), combine_fused(x, gate, slots))
    }
    fn mul_constant<S: Shape, T: Tp<Self>>(
        mode: KernelMode,
        x: Tensor<S, f32, Self, T>,
        c: &[f32],
    ) -> Tensor<S, f32, Self, T> {
        pick!(mode.fuses_layers(), mul_constant_plain(x, c), mul_constant_fused(x, c))
    }
    fn residual_add<T: Tp<Self>>(mode: KernelMode, x: Act<Self, T>, res: Act<Self, NoneTape>) -> Act<Self, T> {
        pick!(mode.fuses_layers(), residual_add_plain(x, res), residual_add_fused(x, res))
    }
    fn relu<S: Shape, T: Tp<Self>>(mode: KernelMode, x: Tensor<S, f32, Self, T>) -> Tensor<S, f32, Self, T> {
        pick!(mode.fuses_layers(), relu_plain(x), relu_fused(x))
    }
    fn softmax_rows<T: Tp<Self>>(mode: KernelMode, x: Act<Self, T>) -> Act<Self, T> {
        pick!(mode.fuses_router(), softmax_rows_plain(x), softmax_rows_fused(x))
    }
    fn logsumexp_sq_mean<T: Tp<Self>>(mode: KernelMode, x: Act<Self, T>) -> Tensor<(), f32, Self, T> {
        pick!(mode.fuses_router(), logsumexp_sq_mean_plain(x), logsumexp_sq_mean_fused(x))
    }
    fn dot_constant<T: Tp<Self>>(mode: KernelMode, x: Act<Self, T>, c: &[f32]) -> Tensor<(), f32, Self, T> {
        pick!(mode.fuses_router(), dot_constant_plain(x, c), dot_constant_fused(x, c))
    }
}

static POISON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// For tests: every buffer a kernel is to overwrite (an output, or a gradient it writes first)
/// is filled with NaN before the kernel writes it, for the rest of this process, so an element
/// the kernel leaves unwritten shows up in the results instead of a stale value.
pub fn set_poison_overwrites(on: bool) {
    POISON.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// A buffer about to be overwritten: poisoned under [`set_poison_overwrites`], else as it is.
pub(crate) fn to_overwrite(buf: &mut [f32]) -> &mut [f32] {
    if POISON.load(std::sync::atomic::Ordering::Relaxed) {
        buf.fill(f32::NAN);
    }
    buf
}

/// A tensor whose values `fill` writes in place (into zeros). The buffer comes from the device
/// (and so from dfdx's buffer cache when it is on): a buffer made here with `vec!` would be handed
/// to the cache when the tensor drops and never taken back out, growing memory every step.
pub(crate) fn with_output<S: Shape>(dev: &Cpu, shape: S, fill: impl FnOnce(&mut [f32])) -> Tensor<S, f32, Cpu> {
    let mut out = dev.zeros_like(&shape);
    fill(out.host_slice_mut());
    out
}

/// [`with_output`] for a `fill` that writes every element: the buffer is not zero-filled first
/// (the patched dfdx's `Cpu::try_tensor_for_overwrite`; one taken from the cache holds stale values).
pub(crate) fn with_overwritten_output<S: Shape>(
    dev: &Cpu,
    shape: S,
    fill: impl FnOnce(&mut [f32]),
) -> Tensor<S, f32, Cpu> {
    let mut out = dev.try_tensor_for_overwrite(shape).expect("out of memory for a kernel's output");
    fill(to_overwrite(out.host_slice_mut()));
    out
}

/// `t`'s elements in place, row-major (the patched dfdx's `host_slice`, see
/// `vendor/dfdx/SWITCHLAB_PATCH.md`). `t` must have standard strides, as every output of a dfdx op
/// or kernel has: a broadcast tensor fails the length check here; nothing passes a permuted one.
pub(crate) fn data<S: Shape, T>(t: &Tensor<S, f32, Cpu, T>) -> &[f32] {
    let d = t.host_slice();
    assert_eq!(d.len(), t.shape().num_elements(), "a fused kernel needs a tensor with standard strides");
    d
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
pub(crate) type Operand<'a> = (&'a [f32], usize, usize);

/// `dst (rows × cols, row-major) [+]= lhs (rows × inner) · rhs (inner × cols)` on this thread,
/// with gemm 0.19 (its fastest kernel for this CPU, chosen at run time).
pub(crate) fn gemm_into(dst: &mut [f32], shape: (usize, usize, usize), lhs: Operand, rhs: Operand, accumulate: bool) {
    gemm_strided((dst, shape.1), shape, lhs, rhs, accumulate)
}

/// [`gemm_into`] into a destination whose rows are `dst_rs` apart (a column block of a wider matrix).
pub(crate) fn gemm_strided(
    (dst, dst_rs): (&mut [f32], usize),
    (rows, cols, inner): (usize, usize, usize),
    lhs: Operand,
    rhs: Operand,
    accumulate: bool,
) {
    assert!(dst.len() >= (rows - 1) * dst_rs + cols);
    assert!(lhs.0.len() > (rows - 1) * lhs.1 + (inner - 1) * lhs.2);
    assert!(rhs.0.len() > (inner - 1) * rhs.1 + (cols - 1) * rhs.2);
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

/// `x · W` with gemm 0.19, each way in one call per expert. With g = ∂L/∂y:
/// ∂L/∂x = g · Wᵀ and ∂L/∂W = xᵀ · g, accumulated into the existing gradients.
pub fn param_matmul_fused<T: Tp<Cpu>>(x: Act3<Cpu, T>, w: &Param<Cpu>, layout: Stacked) -> Act3<Cpu, T> {
    products_fused(x, w, layout, None)
}

/// [`param_matmul_fused`] on expert slots `x` `[E, c, k]` of which expert i uses only its first
/// `rows_in_use[i]` rows (up to its last filled slot; the rest hold no token, so no gradient
/// reaches them): only those rows are multiplied for the output and ∂x, whose other rows are zero,
/// and ∂x and ∂W run [`slots`]' loops where they beat gemm ([`KernelMode::FusedSlots`]). The same
/// model to float rounding, not bit for bit.
pub fn expert_matmul_fused<T: Tp<Cpu>>(
    x: Act3<Cpu, T>,
    w: &Param<Cpu>,
    layout: Stacked,
    rows_in_use: &[usize],
) -> Act3<Cpu, T> {
    assert_eq!(rows_in_use.len(), layout.experts, "expert_matmul: one count of rows per expert");
    products_fused(x, w, layout, Some(rows_in_use))
}

/// `dst (rows × cols)` [+]= a product over its first `in_use` rows, by `product(rows in use)`; the
/// other rows are zeroed, or left as they are when accumulating.
fn rows_in_use_only(dst: &mut [f32], cols: usize, in_use: usize, add: bool, product: impl FnOnce(&mut [f32], usize)) {
    let (used, idle) = dst.split_at_mut(in_use * cols);
    if in_use > 0 {
        product(used, in_use);
    }
    if !add {
        idle.fill(0.0);
    }
}

/// Which backward products [`expert_matmul_fused`] runs with [`slots`]' loops rather than gemm:
/// where they measured faster (1 thread, AVX-512, 5–40 slots of d_model 64, d_ff 256): ∂x as dot
/// products when the rows they sum are long (m ≥ 128), ∂W over up to 64 slots.
#[derive(Clone, Copy)]
struct OwnKernels {
    dx: bool,
    dw: bool,
}

impl OwnKernels {
    fn for_shape(slots_used: bool, layout: Stacked, c: usize) -> Self {
        let fits = slots_used && !layout.transposed && layout.m.is_multiple_of(slots::LANES) && slots::available();
        Self { dx: fits && layout.m >= 128, dw: fits && c <= 64 }
    }
}

fn products_fused<T: Tp<Cpu>>(
    x: Act3<Cpu, T>,
    w: &Param<Cpu>,
    layout: Stacked,
    rows_in_use: Option<&[usize]>,
) -> Act3<Cpu, T> {
    let (e, c, k) = *x.shape();
    let m = layout.m;
    let own_kernels = OwnKernels::for_shape(rows_in_use.is_some(), layout, c);
    assert_eq!((e, k), (layout.experts, layout.k), "param_matmul: x is [{e}, {c}, {k}], the weight {layout:?}");
    assert_eq!(
        w.shape().0,
        e * k * m,
        "param_matmul: the weight has {} entries, {layout:?} needs {}",
        w.shape().0,
        e * k * m
    );
    // Rows in use of expert i among the `rows` rows of a block starting at row r0 (the counts
    // copied: the backward pass needs them too).
    let rows_in_use = rows_in_use.map(<[usize]>::to_vec);
    let in_use = move |i: usize, r0: usize, rows: usize| {
        rows_in_use.as_ref().map_or(rows, |r| r[i].saturating_sub(r0).min(rows))
    };
    // The clock's FLOPs: forward and ∂x over the rows in use, ∂W too where the own kernel runs it.
    let used = (0..e).map(|i| in_use(i, 0, c)).sum::<usize>();
    let (product_flops, dw_flops) = (2 * k * m * used, 2 * k * m * if own_kernels.dw { used } else { e * c });
    let dev = x.device().clone();
    let (x, mut tape) = x.split_tape();
    let (w_rs, w_cs) = layout.strides();
    let out = product_clock::time(product_flops, || {
        with_overwritten_output(&dev, (e, c, m), |y| {
            let (xs, ws) = (data(&x), data(w));
            by_blocks(y, e, (c, m), |i, r0, y| {
                let (xi, wi) = (&xs[(i * c + r0) * k..], &ws[i * k * m..]);
                rows_in_use_only(y, m, in_use(i, r0, y.len() / m), false, |y, rows| {
                    gemm_into(y, (rows, m, k), (xi, k, 1), (wi, w_rs, w_cs), false)
                })
            })
        })
    });
    let (x_ghost, w_ghost, out_ghost) = (x.ghost(), w.ghost(), out.ghost());
    let w = w.clone(); // shares the weights' buffer until the backward pass has run
    tape.add_backward_op(move |grads| {
        product_clock::time(product_flops + dw_flops, || {
            let (xs, ws) = (data(&x), data(&w));
            // Each product writes every element of its gradient: the first writer overwrites.
            // ∂x (c × k) += g (c × m) · Wᵀ (m × k): Wᵀ swaps W's strides.
            let (gx, add, g) = input_for_overwrite_and_output_grads!(grads, &x_ghost, &out_ghost);
            by_blocks(gx, e, (c, k), |i, r0, gx| {
                let (gi, wi) = (&g[(i * c + r0) * m..], &ws[i * k * m..]);
                rows_in_use_only(gx, k, in_use(i, r0, gx.len() / k), add, |gx, rows| {
                    if own_kernels.dx {
                        slots::dot_product(gx, (rows, k, m), gi, wi, add)
                    } else {
                        gemm_into(gx, (rows, k, m), (gi, m, 1), (wi, w_cs, w_rs), add)
                    }
                })
            });
            // ∂W (k × m) += xᵀ (k × c) · g (c × m); stored transposed (m × k): += gᵀ · x. gemm sums
            // over every row (the rows not in use add zeros, and a shorter inner dimension would
            // change gemm's order, so ∂W keeps param_matmul_fused's bits); the own kernel over the
            // rows in use only (the same bits either way).
            let (rows, cols) = if layout.transposed { (m, k) } else { (k, m) };
            let (gw, add, g) = input_for_overwrite_and_output_grads!(grads, &w_ghost, &out_ghost);
            by_blocks(gw, e, (rows, cols), |i, r0, gw| {
                let (xi, gi) = (&xs[i * c * k..], &g[i * c * m..]);
                let block_rows = gw.len() / cols;
                if own_kernels.dw {
                    slots::broadcast_product(gw, (block_rows, cols, in_use(i, 0, c)), (&xi[r0..], 1, k), gi, add)
                } else if layout.transposed {
                    gemm_into(gw, (block_rows, cols, c), (&gi[r0..], 1, m), (xi, k, 1), add)
                } else {
                    gemm_into(gw, (block_rows, cols, c), (&xi[r0..], 1, k), (gi, m, 1), add)
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
    let mut probs = data(&logits).to_vec();
    let row_loss = |(row, &t): (&mut [f32], &usize)| {
        let target = row[t];
        let (max, sum) = wide!(|| softmax_row(row));
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
        // Usually the logits' only consumer: then it overwrites their gradient (no zero fill of the
        // step's largest buffer at a large vocabulary), else it adds to it.
        let (g, add, out_grad) = input_for_overwrite_and_output_grads!(grads, &logits_ghost, &out_ghost);
        let scale = out_grad[0] / n as f32;
        assert_eq!(g.len(), n * v, "cross_entropy_fused needs contiguous logits");
        wide!(|| {
            for ((g, p), &t) in g.chunks_exact_mut(v).zip(probs.chunks_exact(v)).zip(&targets) {
                if add {
                    g.iter_mut().zip(p).for_each(|(g, p)| *g += scale * p);
                } else {
                    // dfdx's zero fill and add, without the fill: `0 + v` (+0 where v is −0)
                    g.iter_mut().zip(p).for_each(|(g, p)| *g = 0.0 + scale * p);
                }
                g[t] -= scale;
            }
        });
        Ok(())
    });
    out.put_tape(tape)
}

/// Scores `p` (rows of `lk`) plus the bias, if any, then each row's softmax, in place.
pub(crate) fn softmax_with_bias(p: &mut [f32], bias: Option<&[f32]>, lk: usize) {
    wide!(|| {
        if let Some(bias) = bias {
            p.iter_mut().zip(bias).for_each(|(s, b)| *s += b);
        }
        p.chunks_exact_mut(lk).for_each(|row| {
            softmax_row(row);
        })
    })
}

/// ∂S = P ⊙ (∂P − rowsum(∂P ⊙ P)) in place of `ds` (∂P), row by row (rows of `lk`).
pub(crate) fn softmax_backward(ds: &mut [f32], p: &[f32], lk: usize) {
    wide!(|| {
        for (d, p) in ds.chunks_exact_mut(lk).zip(p.chunks_exact(lk)) {
            let dot: f32 = d.iter().zip(p).map(|(d, p)| d * p).sum();
            d.iter_mut().zip(p).for_each(|(d, p)| *d = p * (*d - dot));
        }
    })
}

/// Softmax of `row`, in place; returns its max and Σ exp(x − max) (logsumexp = max + ln sum).
/// Branch-free passes the compiler vectorises: [`exp`] instead of libm's scalar `expf`, and the
/// sum in eight interleaved lanes.
#[inline(always)]
pub(crate) fn softmax_row(row: &mut [f32]) -> (f32, f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    row.iter_mut().for_each(|v| *v = exp(*v - max));
    let mut lanes = [0f32; 8];
    let chunks = row.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        lanes.iter_mut().zip(c).for_each(|(l, v)| *l += v);
    }
    let sum = lanes.iter().sum::<f32>() + rest;
    row.iter_mut().for_each(|v| *v /= sum);
    (max, sum)
}

/// eˣ within 2 ulp of the exact value for x ≤ 88, and 0 below −87.3 (where f32's eˣ leaves the
/// normal range; attention's mask is −1e9). x = k·ln 2 + r with |r| ≤ ln 2 / 2 (ln 2 in two parts,
/// so k·ln 2 loses nothing), eˣ = 2ᵏ·eʳ, eʳ by its Taylor polynomial to r⁷ (truncation < 0.1 ulp),
/// 2ᵏ built in the exponent bits. No branch and no libm call, so loops over it vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4; // 355/512: k·LN2_HI is exact for |k| < 2¹⁵
    const LN2_LO: f32 = -2.121_944_4e-4; // ln 2 − LN2_HI
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to the nearest integer
    const C: [f32; 7] = [1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0];
    let xc = x.clamp(-87.3, 88.0);
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let k = t - ROUND;
    let r = (xc - k * LN2_HI) - k * LN2_LO;
    let p = C.iter().fold(0.0, |acc, c| acc * r + c) * r + 1.0;
    let two_k = f32::from_bits(((t.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23) as u32);
    if x < -87.3 {
        0.0
    } else {
        p * two_k
    }
}
