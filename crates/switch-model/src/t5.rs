//! The T5 v1.0-style encoder-decoder (as in the released Switch configs): tied embeddings,
//! pre-norm RMSNorm, bias-free projections, relative-position attention bias, and a feed-forward
//! layer per block that is dense or sparse ([`crate::moe::MoeLayer`]).
use crate::config::{LossReduction, ModelConfig};
use crate::kernels::{KernelMode, PositionBias, Stacked};
use crate::moe::MoeLayer;
use crate::nn::{dropout, truncated_normal, Act, Ctx, ExpertFfn, Linear, ModelParam, Param, RmsNorm, Role, Tp};
use dfdx::prelude::*;
use rand::{rngs::StdRng, SeedableRng};

/// T5's bucketing of relative positions (`memory − query`): exact for small distances,
/// logarithmic up to `max_distance`; the encoder distinguishes left from right.
pub fn relative_position_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut num_buckets = num_buckets as i64;
    let mut ret = 0i64;
    let mut n = -relative_position;
    if bidirectional {
        num_buckets /= 2;
        if n < 0 {
            ret += num_buckets;
        }
        n = n.abs();
    } else {
        n = n.max(0);
    }
    let max_exact = num_buckets / 2;
    if n < max_exact {
        ret + n
    } else {
        let log_ratio = (n as f64 / max_exact as f64).ln() / (max_distance as f64 / max_exact as f64).ln();
        let large = max_exact + (log_ratio * (num_buckets - max_exact) as f64) as i64;
        ret + large.min(num_buckets - 1)
    }
    .try_into()
    .expect("bucket is non-negative")
}

/// Multi-head attention without biases and without 1/√d_kv scaling: T5 (Mesh TF) folds it into
/// the query's init, σ_q = √(s / (d_model · d_kv)), so on unit-RMS inputs the initial attention
/// logits have a std of about `init_scale`, whatever d_kv is.
pub struct Attention<D: Device<f32>> {
    pub q: Linear<D>,
    pub k: Linear<D>,
    pub v: Linear<D>,
    pub o: Linear<D>,
    pub num_heads: usize,
    pub d_kv: usize,
}

impl<D: crate::kernels::Kernels> Attention<D> {
    fn new(dev: &D, rng: &mut StdRng, cfg: &ModelConfig) -> Self {
        let (d, h, s) = (cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.init_scale);
        Self {
            q: Linear::new(dev, rng, d, h, s / cfg.d_kv as f64),
            k: Linear::new(dev, rng, d, h, s),
            v: Linear::new(dev, rng, d, h, s),
            o: Linear::new(dev, rng, h, d, s),
            num_heads: cfg.num_heads,
            d_kv: cfg.d_kv,
        }
    }

    /// `query`: `[batch·Lq, d]`, `memory`: `[batch·Lk, d]`; `bias`: the stack's relative positions.
    fn forward<T: Tp<D>>(
        &self,
        query: Act<D, T>,
        memory: Act<D, T>,
        batch: usize,
        bias: Option<&PositionBias<D>>,
        kernels: KernelMode,
    ) -> Act<D, T> {
        let (memory, memory_tape) = memory.split_tape();
        let q = self.q.forward(query, kernels);
        let k = self.k.forward(memory.clone().put_tape(memory_tape), kernels);
        let v = self.v.forward(memory.retaped::<T>(), kernels);
        self.o.forward(D::attention(kernels, q, k, v, bias, batch, self.num_heads), kernels)
    }

    fn params(&mut self) -> [ModelParam<'_, D>; 4] {
        let a = Role::Attention;
        [self.q.param("q", a), self.k.param("k", a), self.v.param("v", a), self.o.param("o", a)]
    }
}

/// A block's feed-forward layer: dense, or sparse with a router.
pub enum FeedForward<D: Device<f32>> {
    Dense(ExpertFfn<D>),
    Sparse(MoeLayer<D>),
}

pub struct Block<D: Device<f32>> {
    pub self_attn_norm: RmsNorm<D>,
    pub self_attn: Attention<D>,
    /// Decoder blocks only.
    pub cross_attn: Option<(RmsNorm<D>, Attention<D>)>,
    pub ffn_norm: RmsNorm<D>,
    pub ffn: FeedForward<D>,
}

impl<D: crate::kernels::Kernels> Block<D> {
    /// The block's parameters, named within it (`self_attn.q`, `moe.router`, …).
    fn params(&mut self) -> Vec<ModelParam<'_, D>> {
        let mut out = vec![self.self_attn_norm.param("self_attn_norm")];
        out.extend(self.self_attn.params().into_iter().map(|p| p.under("self_attn")));
        if let Some((norm, attn)) = &mut self.cross_attn {
            out.push(norm.param("cross_attn_norm"));
            out.extend(attn.params().into_iter().map(|p| p.under("cross_attn")));
        }
        out.push(self.ffn_norm.param("ffn_norm"));
        match &mut self.ffn {
            FeedForward::Dense(f) => out.extend(f.params(Role::Ffn).into_iter().map(|p| p.under("ffn"))),
            FeedForward::Sparse(m) => out.extend(m.params().into_iter().map(|p| p.under("moe"))),
        }
        out
    }
}

/// An encoder or decoder stack; the relative-position bias is shared by its layers, as in T5.
pub struct Stack<D: Device<f32>> {
    pub blocks: Vec<Block<D>>,
    pub final_norm: RmsNorm<D>,
    pub relative_bias: Param<D>,
    pub is_decoder: bool,
}

/// Losses and statistics of one forward pass; `total` carries the tape when training.
pub struct LossOutput<D: Device<f32>, T> {
    pub total: Tensor<(), f32, D, T>,
    /// Mean cross-entropy per target token, nats.
    pub cross_entropy: f32,
    pub balance_loss: f32,
    pub z_loss: f32,
    /// Each sparse layer's routing, tagged with its name (`encoder.1`, `decoder.1`, …), in order.
    pub routing: Vec<(String, crate::moe::RoutingStats)>,
}

/// What the sparse layers of one forward pass hand back: their losses (tapes still attached)
/// and their routing statistics by layer name.
struct SparseOutputs<D: Device<f32>, T> {
    losses: Vec<(Tensor<(), f32, D, T>, Tensor<(), f32, D, T>)>,
    routing: Vec<(String, crate::moe::RoutingStats)>,
}

/// One batch of span-corruption examples, all of the same lengths (no padding).
#[derive(Clone, Debug)]
pub struct Batch {
    pub batch_size: usize,
    pub encoder_len: usize,
    pub decoder_len: usize,
    /// `[batch · encoder_len]`, row-major.
    pub encoder_ids: Vec<usize>,
    /// Targets shifted right behind the start token 0.
    pub decoder_input_ids: Vec<usize>,
    pub targets: Vec<usize>,
}

/// The whole model. Every parameter group draws its init from its own stream, seeded by the
/// run's seed and the group's name (`encoder.0.self_attn`, `decoder.1.moe`, …): the same config
/// and seed give the same weights bit for bit, and models that differ only in their feed-forward
/// layers (dense vs Switch, any number of experts) start with identical shared weights — paired
/// seeds, so a per-seed difference between them cancels most of the initialisation noise.
pub struct SwitchTransformer<D: Device<f32>> {
    pub cfg: ModelConfig,
    pub embedding: Param<D>,
    pub encoder: Stack<D>,
    pub decoder: Stack<D>,
    pub dev: D,
}

/// The init stream of the parameter group `name` for seed `seed`.
fn init_rng(seed: u64, name: &str) -> StdRng {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    StdRng::seed_from_u64(h)
}

impl<D: crate::kernels::Kernels> SwitchTransformer<D> {
    pub fn new(dev: &D, cfg: &ModelConfig, seed: u64) -> Result<Self, crate::ConfigError> {
        cfg.validate()?;
        let (d, s) = (cfg.d_model, cfg.init_scale);
        let rng = |name: String| init_rng(seed, &name);
        // An embedding row is selected by a one-hot input: fan-in 1.
        let embedding = truncated_normal(dev, &mut rng("embedding".into()), cfg.vocab_size * d, s, 1);
        let stack = |prefix: &str, layers: usize, is_decoder: bool| Stack {
            blocks: (0..layers)
                .map(|i| Block {
                    self_attn_norm: RmsNorm::new(dev, d),
                    self_attn: Attention::new(dev, &mut rng(format!("{prefix}.{i}.self_attn")), cfg),
                    cross_attn: (is_decoder && !cfg.is_decoder_only()).then(|| {
                        (RmsNorm::new(dev, d), Attention::new(dev, &mut rng(format!("{prefix}.{i}.cross_attn")), cfg))
                    }),
                    ffn_norm: RmsNorm::new(dev, d),
                    ffn: if cfg.is_sparse_layer(i) {
                        FeedForward::Sparse(MoeLayer::new(dev, &mut rng(format!("{prefix}.{i}.moe")), cfg))
                    } else {
                        FeedForward::Dense(ExpertFfn::new(dev, &mut rng(format!("{prefix}.{i}.ffn")), cfg, 1))
                    },
                })
                .collect(),
            final_norm: RmsNorm::new(dev, d),
            relative_bias: truncated_normal(
                dev,
                &mut rng(format!("{prefix}.relative_bias")),
                cfg.relative_attention_num_buckets * cfg.num_heads,
                s,
                1,
            ),
            is_decoder,
        };
        let encoder = stack("encoder", cfg.num_encoder_layers, false);
        let decoder = stack("decoder", cfg.num_decoder_layers, true);
        Ok(Self { cfg: cfg.clone(), embedding, encoder, decoder, dev: dev.clone() })
    }

    /// Sets every sparse layer's balance-loss and z-loss coefficients (for diagnostics that
    /// separate the routers' gradient sources; training keeps the config's).
    pub fn set_router_loss_coefs(&mut self, balance: f64, z: f64) {
        for stack in [&mut self.encoder, &mut self.decoder] {
            for b in &mut stack.blocks {
                if let FeedForward::Sparse(m) = &mut b.ffn {
                    (m.balance_loss_coef, m.z_loss_coef) = (balance, z);
                }
            }
        }
    }

    /// Every parameter with a dotted name, in a fixed order (the checkpoint and optimizer order).
    /// Every trainable parameter, in the order of checkpoints and optimizer state.
    pub fn params(&mut self) -> Vec<ModelParam<'_, D>> {
        let c = &self.cfg;
        let (vocab, d, buckets, heads) = (c.vocab_size, c.d_model, c.relative_attention_num_buckets, c.num_heads);
        let mut out = vec![ModelParam::new("embedding", Role::Embedding, [1, vocab, d], &mut self.embedding)];
        for (prefix, stack) in [("encoder", &mut self.encoder), ("decoder", &mut self.decoder)] {
            if stack.blocks.is_empty() {
                continue; // a decoder-only model's (unused) encoder has no parameters to train
            }
            let bias =
                ModelParam::new("relative_bias", Role::PositionBias, [1, buckets, heads], &mut stack.relative_bias);
            out.push(bias.under(prefix));
            out.push(stack.final_norm.param("final_norm").under(prefix));
            for (i, b) in stack.blocks.iter_mut().enumerate() {
                out.extend(b.params().into_iter().map(|p| p.under(&format!("{prefix}.{i}"))));
            }
        }
        out
    }

    /// [`Self::params`] as (name, parameter) pairs.
    pub fn params_mut(&mut self) -> Vec<(String, &mut Param<D>)> {
        self.params().into_iter().map(|p| (p.name, p.param)).collect()
    }

    /// The stack's relative-position bias for sequences of `len` (plus the causal mask in the decoder).
    fn position_bias(&self, stack: &Stack<D>, len: usize) -> PositionBias<D> {
        let mut buckets = Vec::with_capacity(len * len);
        for q in 0..len {
            for k in 0..len {
                let rel = k as i64 - q as i64;
                buckets.push(relative_position_bucket(
                    rel,
                    !stack.is_decoder,
                    self.cfg.relative_attention_num_buckets,
                    self.cfg.relative_attention_max_distance,
                ));
            }
        }
        PositionBias { table: stack.relative_bias.clone(), buckets, len_q: len, len_k: len, causal: stack.is_decoder }
    }

    fn run_stack<T: Tp<D>>(
        &self,
        stack: &Stack<D>,
        x: Act<D, T>,
        (token_ids, batch): (&[usize], usize),
        memory: Option<&Act<D, NoneTape>>,
        mut memory_tape: Option<T>,
        ctx: &mut Ctx,
        sparse: &mut SparseOutputs<D, T>,
    ) -> Act<D, T> {
        let len = x.shape().0 / batch;
        let (rate, k) = (self.cfg.dropout, ctx.kernels);
        let mut x = dropout(x, rate, ctx);
        let bias = self.position_bias(stack, len);
        for (i, b) in stack.blocks.iter().enumerate() {
            let (res, tape) = x.split_tape();
            let h = b.self_attn_norm.forward(res.clone().put_tape(tape), k);
            let (h, h_tape) = h.split_tape();
            let a = b.self_attn.forward(h.clone().put_tape(h_tape), h.retaped::<T>(), batch, Some(&bias), k);
            x = D::residual_add(k, dropout(a, rate, ctx), res);

            if let Some((norm, attn)) = &b.cross_attn {
                let memory = memory.expect("decoder needs the encoder output");
                let mem = match memory_tape.take() {
                    Some(t) => memory.clone().put_tape(t),
                    None => memory.clone().retaped::<T>(),
                };
                let (res, tape) = x.split_tape();
                let a = attn.forward(norm.forward(res.clone().put_tape(tape), k), mem, batch, None, k);
                x = D::residual_add(k, dropout(a, rate, ctx), res);
            }

            let (res, tape) = x.split_tape();
            let h = b.ffn_norm.forward(res.clone().put_tape(tape), k);
            let y = match &b.ffn {
                FeedForward::Dense(f) => {
                    let n = h.shape().0;
                    let d = self.cfg.d_model;
                    f.forward(h.reshape_like(&(1, n, d)), None, rate, ctx).reshape_like(&(n, d))
                }
                FeedForward::Sparse(m) => {
                    let group_tokens = self.cfg.group_size.unwrap_or(batch).min(batch) * len;
                    let out = m.forward(h, token_ids, group_tokens, ctx);
                    let name = format!("{}.{i}", if stack.is_decoder { "decoder" } else { "encoder" });
                    sparse.losses.push((out.balance_loss, out.z_loss));
                    sparse.routing.push((name, out.routing));
                    out.output
                }
            };
            x = D::residual_add(k, dropout(y, rate, ctx), res);
        }
        dropout(stack.final_norm.forward(x, k), rate, ctx)
    }

    /// Cross-entropy per target token plus the router losses. Pass `OwnedTape` to train,
    /// `NoneTape` to evaluate.
    pub fn loss<T: Tp<D>>(&self, batch: &Batch, ctx: &mut Ctx) -> LossOutput<D, T> {
        let (v, d) = (self.cfg.vocab_size, self.cfg.d_model);
        let b = batch.batch_size;
        let emb = self.embedding.clone().reshape_like(&(v, d));
        let mut sparse = SparseOutputs { losses: Vec::new(), routing: Vec::new() };

        // A decoder-only model reads no encoder output: its decoder has no cross-attention.
        let memory = (!self.cfg.is_decoder_only()).then(|| {
            let enc_in = D::gather_rows(ctx.kernels, emb.clone().retaped::<T>(), &batch.encoder_ids);
            let enc_out = self.run_stack(&self.encoder, enc_in, (&batch.encoder_ids, b), None, None, ctx, &mut sparse);
            enc_out.split_tape()
        });
        let (enc_out, enc_tape) = memory.unzip();

        let dec_in = D::gather_rows(ctx.kernels, emb.clone().retaped::<T>(), &batch.decoder_input_ids);
        let dec_ids = (&batch.decoder_input_ids[..], b);
        let dec_out = self.run_stack(&self.decoder, dec_in, dec_ids, enc_out.as_ref(), enc_tape, ctx, &mut sparse);

        // Tied output layer, scaled by d_model^-1/2 as in T5 v1.0.
        let n = dec_out.shape().0;
        let tied = Stacked { experts: 1, k: d, m: v, transposed: true };
        let scaled = (dec_out * (d as f32).powf(-0.5)).reshape_like(&(1, n, d));
        let logits = D::param_matmul(ctx.kernels, scaled, &self.embedding, tied).reshape_like(&(n, v));
        let ce = D::cross_entropy(ctx.kernels, logits, &batch.targets);
        let cross_entropy = ce.as_vec()[0];

        let layers = sparse.losses.len().max(1) as f32;
        let scale = match self.cfg.router_loss_reduction {
            LossReduction::Sum => 1.0,
            LossReduction::Mean => 1.0 / layers,
        };
        let mut total = ce;
        let (mut balance_sum, mut z_sum) = (0.0f32, 0.0f32);
        for (balance, z) in sparse.losses {
            balance_sum += balance.as_vec()[0] * scale;
            z_sum += z.as_vec()[0] * scale;
            total = total + (balance + z) * scale;
        }
        LossOutput { total, cross_entropy, balance_loss: balance_sum, z_loss: z_sum, routing: sparse.routing }
    }
}
