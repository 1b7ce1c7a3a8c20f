//! `switch-model`: a T5-style encoder-decoder with dense, Switch (top-1) and top-k MoE
//! feed-forward layers on dfdx, with exact parameter and FLOPs accounting.
//!
//! - [`config`]: the runtime-sized [`ModelConfig`] and its validation;
//! - [`nn`]: parameters, init, linear, RMSNorm, dropout, stacked experts;
//! - [`kernels`]: fused CPU kernels beside the plain dfdx ops they replace;
//! - [`moe`]: routing, capacity, dispatch/combine, balance and z-losses;
//! - [`t5`]: the encoder-decoder and its loss;
//! - [`accounting`]: parameter counts and FLOPs per token.
pub mod accounting;
pub mod config;
pub mod kernels;
pub mod moe;
pub mod nn;
pub mod procfs;
pub mod simd;
pub mod t5;
pub mod tensor;

pub use accounting::Accounting;
pub use config::{Activation, ConfigError, LossReduction, ModelConfig, Router, RoutingPriority};
pub use moe::{MoeLayer, RoutingStats};
pub use t5::{Batch, LossOutput, SwitchTransformer};
