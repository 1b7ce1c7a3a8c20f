//! The tensor types every module shares, and the one way to make a tensor from host values
//! while training. Below both `nn` and `kernels`, so neither imports the other back.
use dfdx::prelude::*;

/// A flat parameter tensor.
pub type Param<D> = Tensor<(usize,), f32, D>;
/// 2-D activations `[tokens, features]` carrying tape `T`.
pub type Act<D, T> = Tensor<(usize, usize), f32, D, T>;

/// A tape that can be merged with itself: `OwnedTape` when training, `NoneTape` when evaluating.
pub trait Tp<D: Device<f32>>: Tape<f32, D> + Merge<Self> + 'static {}
impl<D: Device<f32>, T: Tape<f32, D> + Merge<T> + 'static> Tp<D> for T {}

/// A tensor holding `values`, in a buffer taken from the device. dfdx's `tensor_from_vec` wraps
/// the `Vec` itself, and with the buffer cache on (as in training) that buffer enters the cache
/// when the tensor drops and is never reused, so memory would grow with every step's index, noise
/// and mask tensors. Every tensor made from host values while training comes from here or, for
/// indices, from [`crate::kernels::Kernels::indices`].
pub fn device_tensor<S: Shape, D: Device<f32>>(dev: &D, values: &[f32], shape: S) -> Tensor<S, f32, D> {
    let mut t = dev.zeros_like(&shape);
    t.copy_from(values);
    t
}
