//! Exact parameter counts and forward FLOPs, from the same [`ModelConfig`] that builds the model.
//!
//! FLOPs follow Kaplan et al. (the paper's footnote 7): a matmul costs 2 FLOPs per multiply-add;
//! attention adds its score (QKᵀ) and value (AV) products; norms, softmax, activations and
//! embedding lookups are not counted. Per example, with encoder length Lₑ and decoder length L_d,
//! h = num_heads · d_kv and a feed-forward costing 2·m·d_model·d_ff (m = 2 for ReLU, 3 for GEGLU):
//!
//! - encoder layer, per token: 4·2·d·h (q, k, v, o) + 2·2·Lₑ·h (scores, values) + FFN
//! - decoder layer, per token: 4·2·d·h + 2·2·L_d·h (self) + 2·2·d·h (cross q, o) + 2·2·Lₑ·h (cross
//!   scores, values) + FFN; plus, per example, 2·2·d·h·Lₑ for the cross-attention keys and values
//! - a sparse layer costs top_k expert FFNs per token; its router (2·d·E per token) is reported
//!   apart, in [`Accounting::router_flops_per_token`], since the paper matches FLOPs "router aside"
//! - output logits (tied embedding): 2·d·V per decoder token
//! - a decoder-only model (`num_encoder_layers: 0`, Lₑ = 0) has no cross-attention terms
//!
//! FLOPs per token = FLOPs per example ÷ (Lₑ + L_d). Capacity-factor padding is not counted: it
//! is slack in the implementation, not work the algorithm asks for. That is the paper's
//! convention, and the match rule of grids; [`ModelConfig::computed_flops_per_token`] counts
//! what the engine actually computes (the router, and every capacity slot of every expert; under
//! `train.kernels: fused_slots` the forward and ∂x products, and ∂W up to 64 slots, stop at each
//! expert's last filled slot, so this is an upper bound).
use crate::config::{Activation, ModelConfig};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Accounting {
    pub params_total: u64,
    /// Parameters that touch one token: all but the experts a token is not routed to.
    pub params_active: u64,
    pub flops_per_example: f64,
    /// Forward FLOPs per token (encoder + decoder tokens), router excluded.
    pub flops_per_token: f64,
    pub router_flops_per_token: f64,
}

impl ModelConfig {
    /// Parameters of one expert (or of the dense feed-forward layer).
    pub fn ffn_params(&self) -> u64 {
        let mats = match self.activation {
            Activation::Relu => 2,
            Activation::Geglu => 3,
        };
        (mats * self.d_model * self.d_ff) as u64
    }

    pub fn accounting(&self, encoder_len: usize, decoder_len: usize) -> Accounting {
        let d = self.d_model as f64;
        let h = (self.num_heads * self.d_kv) as f64;
        let (le, ld) = (encoder_len as f64, decoder_len as f64);
        let ffn = self.ffn_params();
        let attn = 4 * (self.d_model * self.num_heads * self.d_kv) as u64;
        let expert_flops = 2.0 * ffn as f64;

        // A decoder-only model has one stack (one bias table and final norm) and no cross-attention.
        let (stacks, cross) = if self.is_decoder_only() { (1, 0) } else { (2, 1) };
        let mut params_total = (self.vocab_size * self.d_model) as u64; // tied embedding
        params_total += stacks * (self.relative_attention_num_buckets * self.num_heads) as u64;
        params_total += stacks * self.d_model as u64; // final norms
        let mut params_inactive = 0u64;
        let (mut flops, mut router_flops) = (0.0f64, 0.0f64);

        let mut add_ffn = |sparse: bool, tokens: f64, params_total: &mut u64| {
            if sparse {
                let e = self.num_experts as u64;
                *params_total += e * ffn + (self.d_model * self.num_experts) as u64;
                params_inactive += (e - self.top_k as u64) * ffn;
                router_flops += tokens * 2.0 * d * self.num_experts as f64;
                tokens * self.top_k as f64 * expert_flops
            } else {
                *params_total += ffn;
                tokens * expert_flops
            }
        };
        for i in 0..self.num_encoder_layers {
            params_total += attn + 2 * self.d_model as u64;
            flops += le * (4.0 * 2.0 * d * h + 2.0 * 2.0 * le * h);
            flops += add_ffn(self.is_sparse_layer(i), le, &mut params_total);
        }
        for i in 0..self.num_decoder_layers {
            params_total += (1 + cross) * attn + (2 + cross) * self.d_model as u64;
            flops += ld * (4.0 * 2.0 * d * h + 2.0 * 2.0 * ld * h);
            flops += cross as f64 * (ld * (2.0 * 2.0 * d * h + 2.0 * 2.0 * le * h) + le * 2.0 * 2.0 * d * h);
            flops += add_ffn(self.is_sparse_layer(i), ld, &mut params_total);
        }
        flops += ld * 2.0 * d * self.vocab_size as f64;
        let tokens = le + ld;
        Accounting {
            params_total,
            params_active: params_total - params_inactive,
            flops_per_example: flops,
            flops_per_token: flops / tokens,
            router_flops_per_token: router_flops / tokens,
        }
    }
}

impl ModelConfig {
    /// Forward FLOPs per token as the engine computes them in training, at routing groups of
    /// `batch` examples (`group_size` when set): the convention's count plus the router, with
    /// each sparse layer's `top_k` expert FFNs per token replaced by all of its experts' capacity
    /// slots, filled or not (`fused_slots` skips most empty ones: an upper bound there).
    /// Switch-8 at capacity factor 2.0 computes twice the expert FLOPs of
    /// 1.0, which the convention reports as equal.
    pub fn computed_flops_per_token(&self, encoder_len: usize, decoder_len: usize, batch: usize) -> f64 {
        let a = self.accounting(encoder_len, decoder_len);
        let expert_flops = 2.0 * self.ffn_params() as f64;
        let per_example_slots = |len: usize| {
            let slots = self.num_experts as f64 * self.total_capacity(batch, len, true) as f64;
            slots / batch.max(1) as f64 - (len * self.top_k) as f64
        };
        let sparse = |layers: usize| (0..layers).filter(|&i| self.num_experts > 1 && self.is_sparse_layer(i)).count();
        let extra = sparse(self.num_encoder_layers) as f64 * per_example_slots(encoder_len)
            + sparse(self.num_decoder_layers) as f64 * per_example_slots(decoder_len);
        a.flops_per_token + a.router_flops_per_token + extra * expert_flops / (encoder_len + decoder_len) as f64
    }
}

/// Shapes of one stack's forward pass, for [`ModelConfig::activation_floats`].
struct StackShape {
    layers: usize,
    batch: f64,
    len: f64,
    /// Encoder length for the decoder's cross-attention; `None` in the encoder.
    memory_len: Option<f64>,
    /// Expert slots of a sparse layer: num_experts × capacity summed over routing groups.
    slots: f64,
}

impl ModelConfig {
    /// Upper bound on the f32 activations of one forward pass of `batch` examples, weights
    /// aside. Training (`train`): every intermediate tensor the tape keeps, summed over layers —
    /// per layer the norms, q/k/v, attention scores batch×heads×L×L with the bias sum and
    /// softmax, feed-forward hiddens, router logits and probabilities tokens×experts, expert
    /// buffers experts×capacity×d_ff (at `capacity_factor`) — plus the logits
    /// batch×decoder_len×vocab and their log-softmax. Evaluation: no tape, so only the largest
    /// layer (at `eval_capacity_factor`) or the logits, plus the encoder output.
    /// f64, so 10⁹ experts do not overflow.
    pub fn activation_floats(&self, batch: usize, encoder_len: usize, decoder_len: usize, train: bool) -> f64 {
        let b = batch as f64;
        let (d, v) = (self.d_model as f64, self.vocab_size as f64);
        let slots = |len: usize| self.num_experts as f64 * self.total_capacity(batch, len, train) as f64;
        let enc = StackShape {
            layers: self.num_encoder_layers,
            batch: b,
            len: encoder_len as f64,
            memory_len: None,
            slots: slots(encoder_len),
        };
        let dec = StackShape {
            layers: self.num_decoder_layers,
            batch: b,
            len: decoder_len as f64,
            memory_len: (!self.is_decoder_only()).then_some(encoder_len as f64),
            slots: slots(decoder_len),
        };
        // Output: scaled decoder states, logits, log-softmax (max-shift, exp, result).
        let logits = b * decoder_len as f64 * (d + 4.0 * v);
        let (enc, dec) = (self.stack_floats(&enc, train), self.stack_floats(&dec, train));
        if train {
            enc + dec + logits
        } else {
            enc.max(dec).max(logits) + b * encoder_len as f64 * d
        }
    }

    /// Expert capacity summed over the routing groups of `batch` examples of `len` tokens.
    fn total_capacity(&self, batch: usize, len: usize, train: bool) -> usize {
        let cf = if train { self.capacity_factor } else { self.eval_capacity_factor };
        let group = self.group_size.unwrap_or(batch).clamp(1, batch.max(1));
        let cap = |examples: usize| {
            crate::moe::expert_capacity(cf, examples * len, self.num_experts, self.min_expert_capacity)
        };
        (batch / group) * cap(group) + if !batch.is_multiple_of(group) { cap(batch % group) } else { 0 }
    }

    /// A stack's activations: summed over layers in training, the largest layer in evaluation.
    fn stack_floats(&self, s: &StackShape, train: bool) -> f64 {
        let n = s.batch * s.len;
        let d = self.d_model as f64;
        let (h, hd) = (self.num_heads as f64, (self.num_heads * self.d_kv) as f64);
        let drop = if train && self.dropout > 0.0 { 2.0 * n * d } else { 0.0 }; // mask + product
        let norm = 3.0 * n * d;
        // q, k, v, context and its contiguous copy, output; scores, + bias, softmax (3).
        let attn = |lk: f64| 3.0 * n * hd + 2.0 * n * hd + n * d + 5.0 * s.batch * h * s.len * lk;
        let mut total = n * d + drop + norm; // embedding gather, input dropout, final norm
        for i in 0..s.layers {
            let mut layer = norm + attn(s.len) + 2.0 * h * s.len * s.len + n * d + drop; // + bias gather, residual
            if let Some(le) = s.memory_len {
                layer += norm + attn(le) - 2.0 * n * hd + 2.0 * s.batch * le * hd + n * d + drop;
            }
            layer += norm + n * d + drop; // residual
            layer += if self.is_sparse_layer(i) { self.sparse_floats(n, s.slots, train) } else { self.dense_floats(n) };
            total = if train { total + layer } else { total.max(layer) };
        }
        total
    }

    /// Hidden tensors per row of a feed-forward: matmul + ReLU, or GEGLU's two matmuls, GELU, product.
    fn hidden_per_row(&self) -> f64 {
        match self.activation {
            Activation::Relu => 2.0,
            Activation::Geglu => 4.0,
        }
    }

    fn dense_floats(&self, n: f64) -> f64 {
        n * (self.hidden_per_row() * self.d_ff as f64 + self.d_model as f64)
    }

    fn sparse_floats(&self, n: f64, slots: f64, train: bool) -> f64 {
        let (d, f, e, k) = (self.d_model as f64, self.d_ff as f64, self.num_experts as f64, self.top_k as f64);
        let jitter = if train && self.jitter_eps > 0.0 { 2.0 * n * d } else { 0.0 };
        // logits, z-loss logsumexp (2), softmax (3), host copy, balance weight (host, tensor, product)
        let router = 10.0 * n * e;
        // slot indices (usize: 2 floats each, host and tensor), dispatched input, hiddens, output
        let experts = slots * (4.0 + 2.0 * d + self.hidden_per_row() * f);
        let expert_drop = if train && self.expert_dropout > 0.0 { 2.0 * slots * f } else { 0.0 };
        jitter + router + experts + expert_drop + 3.0 * k * n * d // combine: gather, × gate, sum
    }
}
