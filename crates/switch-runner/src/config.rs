//! The resolved configuration of one run, and merging YAML layers (preset, settings, grid point)
//! into it with every key checked.
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use switch_data::DataConfig;
use switch_model::{kernels::KernelMode, ModelConfig};

/// The learning-rate schedule; both decay as 1/√step after `warmup_steps`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// T5's `rsqrt_decay`: peak · √(warmup / max(step, warmup)), flat at the peak during warmup.
    Rsqrt,
    /// A linear ramp from 0 to the peak over the warmup, then T5's decay (not in T5: gentler on
    /// AdamW's first steps, which the paper's Adafactor does not take).
    LinearWarmupRsqrt,
}

/// The optimizer (see [`crate::optim`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// AdamW with `beta1`, `beta2` and `weight_decay` (this project's default; not the paper's).
    #[default]
    Adamw,
    /// Adafactor as in the paper's T5 / Mesh TF runs: no momentum, factored second moments,
    /// steps relative to each parameter's scale (T5 used a peak `learning_rate` of 0.01).
    Adafactor,
}

/// How AdamW stores its moments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MomentPrecision {
    #[default]
    F32,
    /// bf16, rounded to nearest after every update (not in the paper): a step moves 20 bytes of
    /// optimizer traffic per parameter instead of 28, and the state takes half the memory; m and v
    /// keep 8 significant bits.
    Bf16,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub optimizer: OptimizerKind,
    pub steps: u64,
    pub batch_size: usize,
    /// Peak learning rate; decayed as 1/√step after `warmup_steps`.
    pub learning_rate: f64,
    /// Peak learning rate of the routers alone, on the same schedule (unset: `learning_rate`;
    /// not in the paper).
    pub router_learning_rate: Option<f64>,
    pub warmup_steps: u64,
    pub schedule: Schedule,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Global gradient-norm clip; 0 disables it.
    pub grad_clip: f64,
    pub eval_every: u64,
    pub log_every: u64,
    pub checkpoint_every: u64,
    pub seed: u64,
    /// Examples per evaluation batch.
    pub eval_batch_size: usize,
    /// How AdamW stores its moments m and v: `f32` (the default) or `bf16` (not in the paper; see
    /// [`MomentPrecision`]).
    pub optimizer_moments: MomentPrecision,
    /// The CPU kernels: `fused_slots` (the default: the engine's fused kernels, the router's
    /// softmax and losses fused, and the experts multiply only their slots up to the last filled
    /// one, with the engine's own loops where they beat gemm), `fused` (every slot through gemm,
    /// the router unfused: the default until 2026-12-06, which the grids of the reports made
    /// before then set), `fused_router` (`fused` with the router fused) or `plain` (dfdx's ops,
    /// the reference). Their floating-point order differs, so the run id tells them apart. A
    /// saved `config.yaml` without the key was trained before `fused_slots` became the default,
    /// so it reads as `fused` (a grid's configs always hold the key: they start from the defaults).
    #[serde(default = "kernels_before_the_key")]
    pub kernels: KernelMode,
}

/// `train.kernels` of a config saved without the key: the default then, which the run id also
/// leaves out ([`crate::grid::unhashed_values`]).
fn kernels_before_the_key() -> KernelMode {
    KernelMode::Fused
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            optimizer: OptimizerKind::Adamw,
            steps: 600,
            batch_size: 32,
            learning_rate: 3e-3,
            router_learning_rate: None,
            warmup_steps: 100,
            schedule: Schedule::LinearWarmupRsqrt,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.99,
            grad_clip: 1.0,
            eval_every: 100,
            log_every: 10,
            checkpoint_every: 200,
            seed: 0,
            eval_batch_size: 64,
            optimizer_moments: MomentPrecision::F32,
            kernels: KernelMode::default(),
        }
    }
}

impl TrainConfig {
    /// The learning rate of optimizer step `step` (0-based; the schedule counts from 1).
    pub fn learning_rate_at(&self, step: u64) -> f64 {
        self.scheduled(self.learning_rate, step)
    }

    /// The routers' learning rate at `step`: `router_learning_rate` on the same schedule.
    pub fn router_learning_rate_at(&self, step: u64) -> f64 {
        self.scheduled(self.router_learning_rate.unwrap_or(self.learning_rate), step)
    }

    fn scheduled(&self, peak: f64, step: u64) -> f64 {
        let s = (step + 1) as f64;
        let w = self.warmup_steps.max(1) as f64;
        let decay = (w / s.max(w)).sqrt();
        match self.schedule {
            Schedule::Rsqrt => peak * decay,
            Schedule::LinearWarmupRsqrt => peak * (s / w).min(1.0) * decay,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let pos = |v: u64, k: &str| if v == 0 { Err(format!("train.{k} = 0: use a positive integer")) } else { Ok(()) };
        pos(self.steps, "steps")?;
        pos(self.batch_size as u64, "batch_size")?;
        pos(self.eval_every, "eval_every")?;
        pos(self.log_every, "log_every")?;
        pos(self.checkpoint_every, "checkpoint_every")?;
        pos(self.eval_batch_size as u64, "eval_batch_size")?;
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(format!("train.learning_rate = {}: use a number > 0", self.learning_rate));
        }
        if let Some(r) = self.router_learning_rate.filter(|r| !(r.is_finite() && *r >= 0.0)) {
            return Err(format!(
                "train.router_learning_rate = {r}: use a number ≥ 0 (0 freezes the routers), or leave it unset"
            ));
        }
        for (k, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(format!("train.{k} = {v}: use 0 ≤ β < 1"));
            }
        }
        if !(self.grad_clip >= 0.0 && self.weight_decay >= 0.0) {
            return Err("train.grad_clip and train.weight_decay must be ≥ 0".into());
        }
        if self.optimizer == OptimizerKind::Adafactor && self.optimizer_moments == MomentPrecision::Bf16 {
            return Err(
                "train.optimizer_moments = bf16: only AdamW's moments can be bf16; use f32 or train.optimizer adamw"
                    .into(),
            );
        }
        if self.optimizer == OptimizerKind::Adafactor && self.weight_decay != 0.0 {
            return Err(format!(
                "train.weight_decay = {}: train.optimizer adafactor has no weight decay (as in the paper); use 0 or train.optimizer adamw",
                self.weight_decay
            ));
        }
        Ok(())
    }
}

/// Everything one run needs. `model.vocab_size` always follows the tokenizer (`data`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
}

/// Which section of a resolved config is out of range, with the section's own error.
#[derive(Debug, thiserror::Error)]
pub enum InvalidConfig {
    #[error(transparent)]
    Model(#[from] switch_model::ConfigError),
    #[error(transparent)]
    Data(#[from] switch_data::DataError),
    #[error("{0}")]
    Train(String),
}

impl RunConfig {
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        self.model.validate()?;
        self.data.validate()?;
        // The causal LM has no encoder input; the other objectives need an encoder.
        let causal = self.data.objective == switch_data::Objective::CausalLm;
        if causal != self.model.is_decoder_only() {
            return Err(InvalidConfig::Model(switch_model::ConfigError {
                field: "num_encoder_layers",
                value: self.model.num_encoder_layers.to_string(),
                allowed: format!(
                    "0 (a decoder-only model) with data.objective: causal_lm, at least 1 with span_corruption or prefix_lm (data.objective is {})",
                    serde_json::to_value(self.data.objective).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
                ),
            }));
        }
        self.train.validate().map_err(InvalidConfig::Train)
    }

    /// Encoder and decoder lengths of every example.
    pub fn lengths(&self) -> (usize, usize) {
        let l = self.data.lengths().expect("validated");
        (l.encoder, l.decoder)
    }

    /// A fresh `running` status for this run.
    pub fn new_status(&self) -> switch_rundir::Status {
        let a = self.accounting();
        switch_rundir::Status::new(self.train.steps, a.params_total, a.params_active, a.flops_per_token)
    }

    pub fn accounting(&self) -> switch_model::Accounting {
        let (le, ld) = self.lengths();
        self.model.accounting(le, ld)
    }

    /// FLOPs per token the engine computes in training (router and every capacity slot).
    pub fn computed_flops_per_token(&self) -> f64 {
        let (le, ld) = self.lengths();
        self.model.computed_flops_per_token(le, ld, self.train.batch_size)
    }
}

/// Every dotted leaf key of the config (`model.num_experts`, …), for checks and suggestions.
pub fn valid_keys() -> Vec<String> {
    fn walk(prefix: &str, v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    walk(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, v, out)
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }
    let mut out = Vec::new();
    walk("", &serde_json::to_value(RunConfig::default()).expect("serializable"), &mut out);
    out
}

pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push((prev[j] + (ca != *cb) as usize).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The valid key closest to `key`, for "did you mean" hints.
pub fn closest_key(key: &str) -> String {
    let keys = valid_keys();
    let last = key.rsplit('.').next().unwrap_or(key);
    keys.into_iter()
        .min_by_key(|k| edit_distance(key, k).min(edit_distance(last, k.rsplit('.').next().unwrap_or(k)) + 1))
        .unwrap_or_default()
}

/// Sets `key` (dotted) in the config tree `tree`; the key must exist in the config.
pub fn set_dotted(tree: &mut Value, key: &str, value: Value) -> Result<(), String> {
    let valid = valid_keys();
    if !valid.iter().any(|k| k == key) {
        return Err(format!("unknown key `{key}`; did you mean `{}`?", closest_key(key)));
    }
    let mut node = tree;
    let parts: Vec<&str> = key.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        node =
            node.as_object_mut().and_then(|m| m.get_mut(*p)).ok_or_else(|| format!("`{key}` is not a settable key"))?;
    }
    node.as_object_mut().expect("object").insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

/// `tree` (a whole config as JSON) as a [`RunConfig`]; an error names the key it is about
/// (serde_json's own message names none): the first `section.field` whose value alone, on the
/// defaults, fails as the whole tree did, e.g. ``train.kernels = "bogus": unknown variant `bogus`,
/// expected one of `fused`, `plain`, …``.
pub fn typed(tree: Value) -> Result<RunConfig, String> {
    RunConfig::deserialize(&tree).map_err(|e| match bad_key(&tree) {
        Some((key, value, msg)) => format!("{key} = {value}: {}", in_words(msg)),
        None => in_words(e.to_string()),
    })
}

/// serde's Rust type names in a message, as what to write instead.
fn in_words(msg: String) -> String {
    let numbers = [
        ("expected u64", "expected a whole number ≥ 0"),
        ("expected usize", "expected a whole number ≥ 0"),
        ("expected f64", "expected a number"),
    ];
    numbers.iter().fold(msg, |m, (rust, words)| m.replace(rust, words))
}

fn bad_key(tree: &Value) -> Option<(String, Value, String)> {
    let defaults = serde_json::to_value(RunConfig::default()).expect("serializable");
    tree.as_object()?.iter().find_map(|(section, fields)| {
        fields.as_object()?.iter().find_map(|(field, value)| {
            let mut alone = defaults.clone();
            alone.get_mut(section)?.as_object_mut()?.insert(field.clone(), value.clone());
            let e = RunConfig::deserialize(&alone).err()?;
            Some((format!("{section}.{field}"), value.clone(), e.to_string()))
        })
    })
}

/// Merges a (partial) settings tree into `tree`, key by key.
pub fn merge(tree: &mut Value, settings: &Map<String, Value>, prefix: &str) -> Result<(), String> {
    for (k, v) in settings {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            Value::Object(m) if !valid_keys().contains(&key) => merge(tree, m, &key)?,
            _ => set_dotted(tree, &key, v.clone())?,
        }
    }
    Ok(())
}

/// Adds a "did you mean" to serde's "unknown field" errors.
pub fn explain_yaml_error(message: String) -> String {
    let Some(field) = message.split("unknown field `").nth(1).and_then(|rest| rest.split('`').next()) else {
        return message;
    };
    // Prefer the alternatives serde lists for this position; fall back to every config key.
    let listed: Vec<&str> = message
        .split("expected one of ")
        .nth(1)
        .map(|l| l.lines().next().unwrap_or("").split(", ").map(|k| k.trim_matches('`').trim()).collect())
        .unwrap_or_default();
    let hint = listed
        .iter()
        .min_by_key(|k| edit_distance(field, k))
        .map(|k| k.to_string())
        .unwrap_or_else(|| closest_key(field));
    format!("{message}\nhint: did you mean `{hint}`?")
}
