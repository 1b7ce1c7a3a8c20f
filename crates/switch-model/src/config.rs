//! Model configuration: every size is a runtime value read from YAML, checked by [`ModelConfig::validate`].
use serde::{Deserialize, Serialize};

/// Feed-forward non-linearity: T5 v1.0 ReLU (`relu`) or the gated GELU of T5 v1.1 (`geglu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Relu,
    Geglu,
}

/// How tokens choose their expert.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Router {
    /// The paper's learned router: softmax over a linear map of the token's representation.
    #[default]
    Learned,
    /// A fixed random map from token id to expert (Hash Layers, Roller et al. 2021): no router
    /// training, no balance loss, gate 1 — a control for whether learned routing helps at all.
    Hash,
}

/// Which tokens win when an expert is over capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutingPriority {
    /// Earlier tokens in the group first (Mesh TF, the paper's code).
    Position,
    /// Highest router probability first (V-MoE's batch-prioritized routing).
    BatchPrioritized,
}

/// How the per-layer router losses are combined across Switch layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossReduction {
    /// Added for each layer, as in the paper and Mesh TF.
    Sum,
    /// Averaged over layers, as in T5X.
    Mean,
}

/// A T5-style encoder-decoder whose every `expert_every`-th feed-forward layer is sparse
/// when `num_experts > 1` (Switch with `top_k = 1`, the paper's MoE with `top_k = 2`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub num_heads: usize,
    pub d_kv: usize,
    /// 0 = a decoder-only model: no encoder, no cross-attention (with `data.objective: causal_lm`).
    pub num_encoder_layers: usize,
    pub num_decoder_layers: usize,
    pub activation: Activation,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    /// 1 = dense T5 baseline.
    pub num_experts: usize,
    /// Experts chosen per token: 1 = Switch, 2 = the paper's MoE rows.
    pub top_k: usize,
    /// Every `expert_every`-th feed-forward layer is sparse (2 = every other layer, as in the paper).
    pub expert_every: usize,
    pub capacity_factor: f64,
    pub eval_capacity_factor: f64,
    pub min_expert_capacity: usize,
    /// Examples per routing group: tokens compete for expert capacity only within their group,
    /// in training and evaluation alike, so an example's routing never depends on which other
    /// examples share its batch beyond its group. A group is `group_size` whole examples of one
    /// stack (Mesh TF's `group_size` counts tokens; whole examples keep the encoder's and
    /// decoder's groups aligned). Unset: the whole batch is one group (the runner always sets
    /// it, by default to `train.batch_size`).
    pub group_size: Option<usize>,
    pub routing_priority: RoutingPriority,
    /// `learned` (the paper) or `hash` (a control; top_k 1 only).
    pub router: Router,
    /// α of the load-balancing loss α·N·Σ fᵢPᵢ.
    pub balance_loss_coef: f64,
    pub z_loss_coef: f64,
    pub router_loss_reduction: LossReduction,
    /// ε of the multiplicative router-input jitter U(1−ε, 1+ε); 0 disables it.
    pub jitter_eps: f64,
    /// s in σ = √(s / fan_in) of the truncated-normal init; the paper's reduced scale is 0.1.
    pub init_scale: f64,
    /// Init scale of the router weights alone (default: `init_scale`). Not in the paper: a lever
    /// for small models, whose near-uniform routers scale every expert's output by about 1/E.
    pub router_init_scale: Option<f64>,
    pub dropout: f64,
    pub expert_dropout: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            vocab_size: 4096,
            d_model: 128,
            d_ff: 512,
            num_heads: 4,
            d_kv: 32,
            num_encoder_layers: 2,
            num_decoder_layers: 2,
            activation: Activation::Relu,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            num_experts: 1,
            top_k: 1,
            expert_every: 2,
            capacity_factor: 1.25,
            eval_capacity_factor: 2.0,
            min_expert_capacity: 4,
            group_size: None,
            routing_priority: RoutingPriority::Position,
            router: Router::Learned,
            balance_loss_coef: 0.01,
            z_loss_coef: 0.0,
            router_loss_reduction: LossReduction::Sum,
            jitter_eps: 0.01,
            init_scale: 0.1,
            router_init_scale: None,
            dropout: 0.0,
            expert_dropout: 0.0,
        }
    }
}

/// A config value outside its allowed range: names the field, the value and what is allowed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("model.{field} = {value}: {allowed}")]
pub struct ConfigError {
    pub field: &'static str,
    pub value: String,
    pub allowed: String,
}

fn check(ok: bool, field: &'static str, value: impl ToString, allowed: &str) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError { field, value: value.to_string(), allowed: allowed.to_string() })
    }
}

impl ModelConfig {
    /// Layer `i` of a stack is sparse when `(i + 1) % expert_every == 0`: with 2, layers 1, 3, 5, …
    pub fn is_sparse_layer(&self, i: usize) -> bool {
        self.num_experts > 1 && (i + 1).is_multiple_of(self.expert_every)
    }

    /// No encoder: the decoder alone, without cross-attention.
    pub fn is_decoder_only(&self) -> bool {
        self.num_encoder_layers == 0
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        check(self.vocab_size >= 2, "vocab_size", self.vocab_size, "at least 2")?;
        check(self.d_model > 0, "d_model", self.d_model, "a positive integer")?;
        check(self.d_ff > 0, "d_ff", self.d_ff, "a positive integer")?;
        check(self.num_heads > 0, "num_heads", self.num_heads, "a positive integer")?;
        check(self.d_kv > 0, "d_kv", self.d_kv, "a positive integer")?;
        check(self.num_decoder_layers > 0, "num_decoder_layers", self.num_decoder_layers, "at least 1")?;
        check(
            self.relative_attention_num_buckets >= 4,
            "relative_attention_num_buckets",
            self.relative_attention_num_buckets,
            "at least 4",
        )?;
        check(
            self.relative_attention_max_distance > self.relative_attention_num_buckets / 2,
            "relative_attention_max_distance",
            self.relative_attention_max_distance,
            "larger than half the number of buckets",
        )?;
        check(self.num_experts >= 1, "num_experts", self.num_experts, "at least 1 (1 = dense)")?;
        check(
            self.top_k >= 1 && self.top_k <= self.num_experts.max(1),
            "top_k",
            self.top_k,
            &format!("between 1 and num_experts = {}", self.num_experts),
        )?;
        if self.router == Router::Hash {
            check(self.top_k == 1, "top_k", self.top_k, "1 with router: hash (one expert per token id)")?;
        }
        check(self.expert_every >= 1, "expert_every", self.expert_every, "at least 1 (1 = every layer)")?;
        let finite_pos = |v: f64| v.is_finite() && v > 0.0;
        check(finite_pos(self.capacity_factor), "capacity_factor", self.capacity_factor, "a number > 0")?;
        check(
            finite_pos(self.eval_capacity_factor),
            "eval_capacity_factor",
            self.eval_capacity_factor,
            "a number > 0",
        )?;
        check(self.min_expert_capacity >= 1, "min_expert_capacity", self.min_expert_capacity, "at least 1")?;
        if let Some(g) = self.group_size {
            check(g >= 1, "group_size", g, "at least 1 example (or leave unset for the training batch)")?;
        }
        let finite_nonneg = |v: f64| v.is_finite() && v >= 0.0;
        check(finite_nonneg(self.balance_loss_coef), "balance_loss_coef", self.balance_loss_coef, "a number ≥ 0")?;
        check(finite_nonneg(self.z_loss_coef), "z_loss_coef", self.z_loss_coef, "a number ≥ 0")?;
        check((0.0..1.0).contains(&self.jitter_eps), "jitter_eps", self.jitter_eps, "0 ≤ ε < 1")?;
        check(finite_pos(self.init_scale), "init_scale", self.init_scale, "a number > 0")?;
        if let Some(r) = self.router_init_scale {
            check(finite_pos(r), "router_init_scale", r, "a number > 0 (or leave unset for init_scale)")?;
        }
        check((0.0..1.0).contains(&self.dropout), "dropout", self.dropout, "0 ≤ rate < 1")?;
        check((0.0..1.0).contains(&self.expert_dropout), "expert_dropout", self.expert_dropout, "0 ≤ rate < 1")?;
        Ok(())
    }
}
