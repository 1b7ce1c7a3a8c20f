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
//!
//! FLOPs per token = FLOPs per example ÷ (Lₑ + L_d). Capacity-factor padding is not counted: it
//! is slack in the implementation, not work the algorithm asks for.
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

        let mut params_total = (self.vocab_size * self.d_model) as u64; // tied embedding
        params_total += 2 * (self.relative_attention_num_buckets * self.num_heads) as u64;
        params_total += 2 * self.d_model as u64; // final norms
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
            params_total += 2 * attn + 3 * self.d_model as u64;
            flops += ld * (4.0 * 2.0 * d * h + 2.0 * 2.0 * ld * h);
            flops += ld * (2.0 * 2.0 * d * h + 2.0 * 2.0 * le * h) + le * 2.0 * 2.0 * d * h;
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
