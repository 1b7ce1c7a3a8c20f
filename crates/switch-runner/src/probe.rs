//! Diagnostics of a trained run: where its routers' gradient comes from. A Switch router learns
//! from the cross-entropy only through the gate (the chosen expert's probability scales its
//! output) and from the load-balancing loss directly; if the first is negligible next to the
//! second, the router learns to balance, not to route well.
use crate::config::RunConfig;
use crate::error::Result;
use crate::train::{load_checkpoint, to_batch, Dev, OptimizerState};
use dfdx::prelude::*;
use switch_data::Dataset;
use switch_model::nn::{Ctx, Role};
use switch_model::SwitchTransformer;
use switch_rundir::RunDir;

/// One router's gradient norms, averaged over the probed batches.
#[derive(Clone, Debug, PartialEq)]
pub struct RouterGradient {
    /// The router parameter, e.g. `encoder.1.moe.router`.
    pub name: String,
    /// ‖∂ cross-entropy / ∂ router‖ (balance and z-loss coefficients set to 0).
    pub from_cross_entropy: f64,
    /// ‖∂ (α · balance loss) / ∂ router‖ at the run's α.
    pub from_balance: f64,
}

/// Each router parameter's gradient of the total loss at the current coefficients.
fn router_grads(
    model: &mut SwitchTransformer<Dev>,
    batch: &switch_model::Batch,
    mut ctx: Ctx,
) -> Vec<(String, Vec<f32>)> {
    let out = model.loss::<OwnedTape<f32, Dev>>(batch, &mut ctx);
    let grads = out.total.backward();
    model
        .params()
        .into_iter()
        .filter(|p| p.role == Role::Router)
        .map(|p| (p.name, grads.get(&*p.param).as_vec()))
        .collect()
}

/// Loads the run's last checkpoint and probes its routers on `batches` training batches (those of
/// the steps it trained last), from each loss alone: the two backward passes share the step's
/// randomness (jitter, dropout), so they route identically and the balance part is their
/// difference. `None` when the run has no checkpoint or no sparse layer.
pub fn probe_run(dir: &RunDir, cfg: &RunConfig, ds: &Dataset, batches: u64) -> Result<Option<Vec<RouterGradient>>> {
    let dev = Dev::default();
    let mut model = SwitchTransformer::new(&dev, &cfg.model, cfg.train.seed)?;
    let sizes: Vec<usize> = model.params_mut().iter().map(|(_, p)| p.shape().0).collect();
    let Some(state) = load_checkpoint(dir, &mut model, &mut OptimizerState::adamw(&sizes))? else { return Ok(None) };
    let (balance, z) = (cfg.model.balance_loss_coef, cfg.model.z_loss_coef);
    let mut sums: Vec<RouterGradient> = Vec::new();
    let steps = state.step.saturating_sub(batches)..state.step;
    let probed = (steps.end - steps.start).max(1) as f64;
    for step in steps {
        let batch = to_batch(ds.train_batch(cfg.train.seed, step, cfg.train.batch_size), cfg);
        let seed = switch_data::fnv1a(format!("probe-{}-{step}", cfg.train.seed).as_bytes());
        model.set_router_loss_coefs(0.0, 0.0);
        let ctx = || Ctx::train(seed).with_kernels(cfg.train.kernels);
        let ce = router_grads(&mut model, &batch, ctx());
        model.set_router_loss_coefs(balance, 0.0);
        let with_balance = router_grads(&mut model, &batch, ctx());
        model.set_router_loss_coefs(balance, z);
        for (i, ((name, a), (_, b))) in ce.iter().zip(&with_balance).enumerate() {
            let (from_cross_entropy, from_balance) = (l2(a.iter().copied()), l2(a.iter().zip(b).map(|(a, b)| b - a)));
            if sums.len() <= i {
                sums.push(RouterGradient { name: name.clone(), from_cross_entropy: 0.0, from_balance: 0.0 });
            }
            sums[i].from_cross_entropy += from_cross_entropy / probed;
            sums[i].from_balance += from_balance / probed;
        }
    }
    Ok((!sums.is_empty()).then_some(sums))
}

/// Euclidean norm, summed in f64.
fn l2(v: impl Iterator<Item = f32>) -> f64 {
    v.map(|x| (x as f64).powi(2)).sum::<f64>().sqrt()
}
