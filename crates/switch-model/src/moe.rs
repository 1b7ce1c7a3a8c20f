//! Switch (top-1) and top-k MoE feed-forward layers: router, capacity, dispatch, combine, losses.
//!
//! The routing decision (which expert, which slot, which tokens are dropped) is made on the host
//! from the router probabilities by [`route`], a plain function tested by hand. Dispatch and
//! combine are then two row gathers, O(tokens × d_model), whose backward passes are scatter-adds.
//!
//! ```
//! use switch_model::moe::{route, expert_capacity};
//! use switch_model::RoutingPriority;
//! // 4 tokens, 2 experts, capacity 1: tokens 0 and 1 both prefer expert 0, so token 1 is dropped.
//! let probs = [0.9, 0.1, 0.8, 0.2, 0.3, 0.7, 0.4, 0.6];
//! assert_eq!(expert_capacity(0.5, 4, 2, 1), 1);
//! let r = route(&probs, 2, 1, 1, RoutingPriority::Position);
//! assert_eq!(r.slot_of, vec![Some(0), None, Some(1), None]);
//! assert_eq!(r.first_choice_counts, vec![2, 2]);
//! ```
use crate::config::{ModelConfig, RoutingPriority};
use crate::kernels::{KernelMode, Kernels};
use crate::nn::{Act, Ctx, ExpertFfn, Linear, ModelParam, Role, Tp};
use dfdx::prelude::*;
use rand::{rngs::StdRng, Rng};

/// Expert capacity = ⌈capacity_factor · tokens_in_group / num_experts⌉, at least `min_capacity`,
/// at most the group (an expert never holds one token twice).
pub fn expert_capacity(capacity_factor: f64, tokens_in_group: usize, num_experts: usize, min_capacity: usize) -> usize {
    let c = (capacity_factor * tokens_in_group as f64 / num_experts as f64).ceil() as usize;
    c.max(min_capacity).min(tokens_in_group).max(1)
}

/// The routing of one group of tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    pub num_experts: usize,
    pub capacity: usize,
    /// `choices[t * k + j]`: the j-th choice of token t, by decreasing probability.
    pub choices: Vec<usize>,
    /// Slot (`expert * capacity + position`) of each choice, `None` when dropped.
    pub slot_of: Vec<Option<usize>>,
    /// For each of the `num_experts * capacity` slots, the token it holds (0 for empty slots:
    /// their output is never gathered back, so their gradient is zero).
    pub slot_token: Vec<usize>,
    /// Tokens whose first choice is each expert, before capacity truncation (the fᵢ of the loss).
    pub first_choice_counts: Vec<usize>,
}

/// Routes `n = probs.len() / num_experts` tokens: each picks its `top_k` most probable experts;
/// first choices fill expert buffers before second choices; within a round, tokens queue by
/// position or, with batch-prioritized routing, by their top probability.
pub fn route(probs: &[f32], num_experts: usize, top_k: usize, capacity: usize, priority: RoutingPriority) -> Routing {
    let e = num_experts;
    let n = probs.len() / e;
    let mut choices = Vec::with_capacity(n * top_k);
    for row in probs.chunks_exact(e) {
        push_top_k(row, top_k, &mut choices);
    }
    let mut queue: Vec<usize> = (0..n).collect();
    if priority == RoutingPriority::BatchPrioritized {
        let top = |t: usize| probs[t * e + choices[t * top_k]];
        queue.sort_by(|&a, &b| top(b).partial_cmp(&top(a)).unwrap_or(std::cmp::Ordering::Equal));
    }
    let mut fill = vec![0usize; e];
    let mut slot_of = vec![None; n * top_k];
    let mut slot_token = vec![0usize; e * capacity];
    for j in 0..top_k {
        for &t in &queue {
            let ex = choices[t * top_k + j];
            if fill[ex] < capacity {
                let slot = ex * capacity + fill[ex];
                slot_of[t * top_k + j] = Some(slot);
                slot_token[slot] = t;
                fill[ex] += 1;
            }
        }
    }
    let mut first_choice_counts = vec![0usize; e];
    for t in 0..n {
        first_choice_counts[choices[t * top_k]] += 1;
    }
    Routing { num_experts: e, capacity, choices, slot_of, slot_token, first_choice_counts }
}

/// Appends the indices of `row`'s `k` largest values, largest first, ties to the lower index
/// (the first `k` of a stable sort by descending value, like argmax), in O(k·E) instead of a sort.
fn push_top_k(row: &[f32], k: usize, out: &mut Vec<usize>) {
    let start = out.len();
    for _ in 0..k {
        let mut best: Option<usize> = None;
        for (i, &p) in row.iter().enumerate() {
            if best.is_none_or(|b| p > row[b]) && !out[start..].contains(&i) {
                best = Some(i);
            }
        }
        out.push(best.expect("top_k ≤ num_experts"));
    }
}

/// Routes consecutive groups of `group_tokens` tokens (the last may be shorter) each on its own,
/// with its own capacity `capacity_of(tokens in the group)`: a token competes for an expert only
/// with the tokens of its group. The result is one [`Routing`] over all tokens whose expert
/// buffers hold the groups' slots one after another (`capacity` = slots per expert, all groups).
pub fn route_in_groups(
    probs: &[f32],
    num_experts: usize,
    top_k: usize,
    group_tokens: usize,
    capacity_of: impl Fn(usize) -> usize,
    priority: RoutingPriority,
) -> Routing {
    let e = num_experts;
    let groups: Vec<Routing> = probs
        .chunks(group_tokens.max(1).saturating_mul(e))
        .map(|g| route(g, e, top_k, capacity_of(g.len() / e), priority))
        .collect();
    let total: usize = groups.iter().map(|g| g.capacity).sum();
    let mut out = Routing {
        num_experts: e,
        capacity: total,
        choices: Vec::new(),
        slot_of: Vec::new(),
        slot_token: vec![0; e * total],
        first_choice_counts: vec![0; e],
    };
    let (mut first_token, mut offset) = (0, 0);
    for g in &groups {
        let global = |slot: usize| (slot / g.capacity) * total + offset + slot % g.capacity;
        out.choices.extend_from_slice(&g.choices);
        out.slot_of.extend(g.slot_of.iter().map(|s| s.map(global)));
        for (slot, &t) in g.slot_token.iter().enumerate() {
            out.slot_token[global(slot)] = first_token + t;
        }
        out.first_choice_counts.iter_mut().zip(&g.first_choice_counts).for_each(|(a, c)| *a += c);
        first_token += g.choices.len() / top_k;
        offset += g.capacity;
    }
    out
}

impl Routing {
    /// For each expert, its slots up to and including the last that holds a token: the rows of
    /// its buffer the experts' products must compute (the rest hold no token). With several
    /// routing groups an expert's slots are the groups' segments one after another, so only the
    /// last group's empty tail is left out.
    pub fn rows_in_use(&self) -> Vec<usize> {
        let mut rows = vec![0; self.num_experts];
        for slot in self.slot_of.iter().flatten() {
            let (expert, position) = (slot / self.capacity, slot % self.capacity);
            rows[expert] = rows[expert].max(position + 1);
        }
        rows
    }
}

/// Switch's load-balancing loss (eq. 4), α·N·Σᵢ fᵢ·Pᵢ, averaged over routing groups.
///
/// - `probs`: `[tokens, experts]` router probabilities; Pᵢ = their mean over a group's tokens,
///   the differentiable part.
/// - `first_choices`: `[tokens]`, each token's most probable expert; fᵢ = the fraction of a
///   group's tokens whose first choice is i, counted before capacity truncation (a constant).
/// - `group_tokens`: tokens per group, consecutive (the last group may be shorter).
///
/// Uniform routing gives α; every token on one expert with probability 1 gives α·N.
pub fn load_balancing_loss<D: Kernels, T: Tp<D>>(
    probs: Act<D, T>,
    first_choices: &[usize],
    group_tokens: usize,
    coef: f64,
    kernels: KernelMode,
) -> Tensor<(), f32, D, T> {
    let (n, e) = *probs.shape();
    let group_tokens = group_tokens.clamp(1, n.max(1));
    let num_groups = n.div_ceil(group_tokens);
    // weight[t, i] = f_{g(t), i} / (tokens in g(t) · groups): Σ_t,i probs·weight = mean_g Σᵢ f·P.
    let mut weight = vec![0.0f32; n * e];
    for (g, choices) in first_choices.chunks(group_tokens).enumerate() {
        let size = choices.len() as f32;
        let mut f = vec![0.0f32; e];
        choices.iter().for_each(|&c| f[c] += 1.0 / size);
        let rows = &mut weight[g * group_tokens * e..(g * group_tokens + choices.len()) * e];
        for row in rows.chunks_mut(e) {
            row.iter_mut().zip(&f).for_each(|(w, fi)| *w = fi / (size * num_groups as f32));
        }
    }
    D::dot_constant(kernels, probs, &weight) * (coef * e as f64) as f32
}

/// The router z-loss of ST-MoE, coef · mean over tokens of logsumexp(logits)².
/// `logits`: `[tokens, experts]`.
pub fn router_z_loss<D: Kernels, T: Tp<D>>(logits: Act<D, T>, coef: f64, kernels: KernelMode) -> Tensor<(), f32, D, T> {
    D::logsumexp_sq_mean(kernels, logits) * coef as f32
}

/// Hash routing's one-hot "probabilities" `[tokens, experts]`: token id t goes to a fixed
/// pseudo-random expert (a multiplicative hash of t), the same in every layer, step and run.
pub fn hash_choices(token_ids: &[usize], num_experts: usize) -> Vec<f32> {
    let mut p = vec![0f32; token_ids.len() * num_experts];
    for (i, &t) in token_ids.iter().enumerate() {
        let h = ((t as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 33) as usize;
        p[i * num_experts + h % num_experts] = 1.0;
    }
    p
}

/// What one sparse layer did in one forward pass, for logging.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingStats {
    /// Fraction of the group's tokens whose first choice is each expert (before truncation).
    pub load_fraction: Vec<f32>,
    /// Fraction of (token, choice) assignments dropped for lack of capacity.
    pub drop_fraction: f32,
    /// Mean over tokens of the router distribution's entropy (nats), in evaluation passes only:
    /// it costs a logarithm per router probability (2% of a `tiny` Switch-128 step), and nothing
    /// reads a training step's.
    pub router_entropy: Option<f32>,
}

impl RoutingStats {
    /// The statistics of `routing` over `n` tokens and `k` choices each, with the router's
    /// probabilities `probs` (`[n, E]`, row-major); their entropy only `with_entropy`.
    fn of(routing: &Routing, probs: &[f32], n: usize, k: usize, with_entropy: bool) -> Self {
        let dropped = routing.slot_of.iter().filter(|s| s.is_none()).count();
        let entropy =
            with_entropy.then(|| probs.iter().filter(|&&p| p > 0.0).map(|&p| -p * p.ln()).sum::<f32>() / n as f32);
        RoutingStats {
            load_fraction: routing.first_choice_counts.iter().map(|&c| c as f32 / n as f32).collect(),
            drop_fraction: dropped as f32 / (n * k) as f32,
            router_entropy: entropy,
        }
    }
}

/// A sparse feed-forward layer: router + `num_experts` experts, `top_k` per token.
pub struct MoeLayer<D: Device<f32>> {
    pub router: Linear<D>,
    pub experts: ExpertFfn<D>,
    pub top_k: usize,
    pub capacity_factor: f64,
    pub eval_capacity_factor: f64,
    pub min_expert_capacity: usize,
    pub priority: RoutingPriority,
    pub balance_loss_coef: f64,
    pub z_loss_coef: f64,
    pub jitter_eps: f64,
    pub expert_dropout: f64,
    /// `router: hash`: experts chosen by token id (the router is kept, untrained).
    pub hash_routing: bool,
}

/// Output of a sparse layer: the layer output (zero for dropped tokens), its two losses
/// (already multiplied by their coefficients) and what its routing did.
pub struct MoeOutput<D: Device<f32>, T> {
    pub output: Act<D, T>,
    pub balance_loss: Tensor<(), f32, D, T>,
    pub z_loss: Tensor<(), f32, D, T>,
    pub routing: RoutingStats,
}

impl<D: crate::kernels::Kernels> MoeLayer<D> {
    pub fn new(dev: &D, rng: &mut StdRng, cfg: &ModelConfig) -> Self {
        Self {
            router: Linear::new(
                dev,
                rng,
                cfg.d_model,
                cfg.num_experts,
                cfg.router_init_scale.unwrap_or(cfg.init_scale),
            ),
            experts: ExpertFfn::new(dev, rng, cfg, cfg.num_experts),
            top_k: cfg.top_k,
            capacity_factor: cfg.capacity_factor,
            eval_capacity_factor: cfg.eval_capacity_factor,
            min_expert_capacity: cfg.min_expert_capacity,
            priority: cfg.routing_priority,
            balance_loss_coef: cfg.balance_loss_coef,
            z_loss_coef: cfg.z_loss_coef,
            jitter_eps: cfg.jitter_eps,
            expert_dropout: cfg.expert_dropout,
            hash_routing: cfg.router == crate::Router::Hash,
        }
    }

    /// `x`: `[tokens, d_model]`, routed in consecutive groups of `group_tokens` tokens.
    ///
    /// `token_ids`: each token's id, for hash routing (ignored by the learned router).
    ///
    /// Tape rule: `x`'s tape (every op below this layer) travels through the router branch and
    /// ends in the z-loss, so the z-loss must reach the total loss even at coefficient 0, or
    /// everything below this layer gets no gradient. Hash routing keeps that branch, with both
    /// router losses at coefficient 0 and the gate fixed at 1, so the router gets no gradient.
    pub fn forward<T: Tp<D>>(
        &self,
        x: Act<D, T>,
        token_ids: &[usize],
        group_tokens: usize,
        ctx: &mut Ctx,
    ) -> MoeOutput<D, T> {
        let (n, d) = *x.shape();
        let (e, k) = (self.experts.num_experts, self.top_k);
        let dev = x.device().clone();
        let (x, x_tape) = x.split_tape();

        // Router, in f32, on its own (jittered) copy of the input so the noise never reaches the experts.
        let router_in = self.jitter(x.clone().put_tape(x_tape), ctx);
        let (logits, logits_tape) = self.router.forward(router_in, ctx.kernels).split_tape();
        let (z_coef, balance_coef) =
            if self.hash_routing { (0.0, 0.0) } else { (self.z_loss_coef, self.balance_loss_coef) };
        let z_loss = router_z_loss(logits.clone().put_tape(logits_tape), z_coef, ctx.kernels);
        let probs = D::softmax_rows(ctx.kernels, logits.retaped::<T>());
        let (probs, probs_tape) = probs.split_tape();
        let probs_host = if self.hash_routing {
            std::borrow::Cow::Owned(hash_choices(token_ids, e))
        } else {
            D::host_values(&probs)
        };

        let cf = if ctx.train { self.capacity_factor } else { self.eval_capacity_factor };
        let capacity_of = |tokens| expert_capacity(cf, tokens, e, self.min_expert_capacity);
        let routing = route_in_groups(&probs_host, e, k, group_tokens, capacity_of, self.priority);
        let capacity = routing.capacity;
        let first_choices: Vec<usize> = routing.choices.iter().step_by(k).copied().collect();
        let balance_loss = load_balancing_loss(
            probs.clone().put_tape(probs_tape),
            &first_choices,
            group_tokens,
            balance_coef,
            ctx.kernels,
        );

        // Dispatch: gather each slot's token into [E, capacity, d] and run all experts at once.
        let expert_in =
            D::gather_rows(ctx.kernels, x.retaped::<T>(), &routing.slot_token).reshape_like(&(e, capacity, d));
        let rows_in_use = routing.rows_in_use();
        let expert_out = self
            .experts
            .forward(expert_in, Some(&rows_in_use), self.expert_dropout, ctx)
            .reshape_like(&(e * capacity, d));
        let (expert_out, out_tape) = expert_out.split_tape();
        let mut out_tape = Some(out_tape);

        // Combine: each choice gathers its slot back, times its gate; dropped choices get gate 0.
        let choice = |j: usize| {
            let chosen: Vec<usize> = (0..n).map(|t| routing.choices[t * k + j]).collect();
            dev.indices(&chosen)
        };
        let select_prob = |j: usize| probs.clone().retaped::<T>().select(choice(j));
        let mut output: Option<Act<D, T>> = None;
        for j in 0..k {
            let gate = if self.hash_routing {
                select_prob(0) * 0.0 + 1.0 // gate 1, and no gradient to the unused router
            } else if k == 1 {
                select_prob(0) // Switch: the raw probability, which is what trains the router
            } else {
                let mut denom = select_prob(0);
                for i in 1..k {
                    denom = denom + select_prob(i);
                }
                select_prob(j) / denom
            };
            let slots: Vec<Option<usize>> = (0..n).map(|t| routing.slot_of[t * k + j]).collect();
            let gathered_from = match out_tape.take() {
                Some(tape) => expert_out.clone().put_tape(tape),
                None => expert_out.clone().retaped::<T>(),
            };
            let y = D::combine(ctx.kernels, gathered_from, gate, &slots);
            output = Some(match output {
                None => y,
                Some(acc) => acc + y,
            });
        }

        let stats = RoutingStats::of(&routing, &probs_host, n, k, !ctx.train);
        MoeOutput { output: output.expect("top_k >= 1"), balance_loss, z_loss, routing: stats }
    }

    /// The router's input times uniform noise in [1 − ε, 1 + ε] while training (the paper's
    /// jitter); unchanged otherwise.
    fn jitter<T: Tp<D>>(&self, router_in: Act<D, T>, ctx: &mut Ctx) -> Act<D, T> {
        if !(ctx.train && self.jitter_eps > 0.0) {
            return router_in;
        }
        let (n, d) = *router_in.shape();
        let eps = self.jitter_eps as f32;
        let noise: Vec<f32> = (0..n * d).map(|_| ctx.rng.gen_range(1.0 - eps..=1.0 + eps)).collect();
        D::mul_constant(ctx.kernels, router_in, &noise)
    }

    /// The router `[1, d, E]`, then the experts.
    pub fn params(&mut self) -> Vec<ModelParam<'_, D>> {
        let mut v = vec![self.router.param("router", Role::Router)];
        v.extend(self.experts.params(Role::Expert));
        v
    }
}
