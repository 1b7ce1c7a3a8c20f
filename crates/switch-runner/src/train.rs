//! The training loop of one run: AdamW or Adafactor ([`crate::optim`]) with warmup and
//! inverse-square-root decay, gradient clipping, periodic evaluation on the validation split,
//! streamed metrics, atomic checkpoints, and one score on the test split at the end.
//!
//! Every random choice at step `s` (batch, jitter, dropout) is drawn from `(seed, s)`, and the
//! checkpoint holds the weights and optimizer moments bit for bit, so an interrupted run resumes
//! to the same numbers as an uninterrupted one.
use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::optim::sum_of_squares;
use crate::rundir::{self, MetricsRow, RoutingRow, RunDir, State, Status, StatusFile};
use dfdx::prelude::*;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use switch_data::{Dataset, Example, Split};
use switch_model::nn::{Ctx, Role};
use switch_model::{Batch, SwitchTransformer};

pub type Dev = Cpu;
pub use crate::optim::OptimizerState;

/// The model's batch of a data example.
pub fn to_batch(e: Example, cfg: &RunConfig) -> Batch {
    let (encoder_len, decoder_len) = cfg.lengths();
    Batch {
        batch_size: e.batch_size,
        encoder_len,
        decoder_len,
        encoder_ids: e.encoder_ids,
        decoder_input_ids: e.decoder_input_ids,
        targets: e.targets,
    }
}

/// Examples per evaluation batch: `eval_batch_size` rounded down to whole routing groups (at
/// least one), so every held-out example is routed with the same group mates whatever the batch.
pub fn eval_batch_examples(cfg: &RunConfig) -> usize {
    let group = cfg.model.group_size.unwrap_or(cfg.train.eval_batch_size).max(1);
    (cfg.train.eval_batch_size / group).max(1) * group
}

/// Routing statistics of each sparse layer, by name.
pub type LayerRouting = Vec<(String, switch_model::RoutingStats)>;

/// Cross-entropy per target token on a held-out `split`, and per-layer routing statistics
/// averaged over the batches (weighted by target tokens).
pub fn evaluate(model: &SwitchTransformer<Dev>, ds: &Dataset, cfg: &RunConfig, split: Split) -> (f64, LayerRouting) {
    let batches = ds.eval_batches(split, eval_batch_examples(cfg));
    let (mut total, mut count) = (0.0f64, 0usize);
    let mut routing: LayerRouting = Vec::new();
    for b in batches {
        let n = b.targets.len();
        let out = model.loss::<NoneTape>(&to_batch(b, cfg), &mut Ctx::eval().with_kernels(cfg.train.kernels));
        total += out.cross_entropy as f64 * n as f64;
        count += n;
        if routing.is_empty() {
            routing = out.routing.iter().map(|(name, s)| (name.clone(), scaled(s, 0.0))).collect();
        }
        for ((_, acc), (_, s)) in routing.iter_mut().zip(&out.routing) {
            let s = scaled(s, n as f32);
            acc.drop_fraction += s.drop_fraction;
            if let (Some(a), Some(e)) = (&mut acc.router_entropy, s.router_entropy) {
                *a += e;
            }
            acc.load_fraction.iter_mut().zip(&s.load_fraction).for_each(|(a, l)| *a += l);
        }
    }
    let routing = routing.into_iter().map(|(name, s)| (name, scaled(&s, 1.0 / count as f32))).collect();
    (total / count as f64, routing)
}

/// Every statistic of `s` times `w`.
fn scaled(s: &switch_model::RoutingStats, w: f32) -> switch_model::RoutingStats {
    switch_model::RoutingStats {
        load_fraction: s.load_fraction.iter().map(|l| l * w).collect(),
        drop_fraction: s.drop_fraction * w,
        router_entropy: s.router_entropy.map(|e| e * w),
    }
}

/// What happened to a run.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Done,
    /// Stopped by the user after checkpointing; resumable.
    Interrupted,
}

/// Progress callback: (step, train loss, tokens per second).
pub type Progress<'a> = &'a (dyn Fn(u64, f32, f64) + Sync);

/// Losses of one training step (the cross-entropy and the router losses, as logged).
pub struct StepLosses {
    pub cross_entropy: f32,
    pub balance_loss: f32,
    pub z_loss: f32,
}

/// One optimizer step on `batch` at step `step` (0-based): forward, backward, global-norm
/// clipping, the optimizer. Returns the losses, each sparse layer's routing and the learning rate.
pub fn train_step(
    model: &mut SwitchTransformer<Dev>,
    opt: &mut OptimizerState,
    batch: &Batch,
    cfg: &RunConfig,
    step: u64,
) -> Result<(StepLosses, LayerRouting, f64)> {
    let t = &cfg.train;
    let mut ctx = Ctx::train(switch_data::fnv1a(format!("step-{}-{step}", t.seed).as_bytes())).with_kernels(t.kernels);
    let out = model.loss::<OwnedTape<f32, Dev>>(batch, &mut ctx);
    let routing = out.routing;
    let losses = StepLosses { cross_entropy: out.cross_entropy, balance_loss: out.balance_loss, z_loss: out.z_loss };
    let loss = out.total.as_vec()[0];
    if !loss.is_finite() {
        return Err(Error::Training(format!("loss became {} at step {step} (cross-entropy {}, balance {}, z {}); try a lower train.learning_rate or model.init_scale", if loss.is_nan() { "NaN" } else { "non-finite" }, out.cross_entropy, out.balance_loss, out.z_loss)));
    }
    // Gradients and weights are read and written in place (the patched dfdx's `host_slice_mut`):
    // no per-step copy or allocation in proportion to the parameters.
    let mut grads = out.total.backward();
    let mut params = model.params();
    let mut norm_sq = 0.0f64;
    for p in params.iter_mut() {
        norm_sq += sum_of_squares(grads.get_or_alloc_mut(&*p.param)?);
    }
    let norm = norm_sq.sqrt();
    let grad_scale = if t.grad_clip > 0.0 && norm > t.grad_clip { (t.grad_clip / norm) as f32 } else { 1.0 };
    let lr = t.learning_rate_at(step);
    let router_lr = t.router_learning_rate_at(step);
    for (k, p) in params.iter_mut().enumerate() {
        let lr = if p.role == Role::Router { router_lr } else { lr };
        let g = grads.get_or_alloc_mut(&p.param.ghost())?;
        opt.update(k, p.param.host_slice_mut(), g, grad_scale, step + 1, lr, t);
    }
    Ok((losses, routing, lr))
}

/// The run's two CSV logs, appended and flushed as training goes.
struct Logs {
    metrics: std::io::BufWriter<std::fs::File>,
    routing: std::io::BufWriter<std::fs::File>,
}

impl Logs {
    /// A `metrics.csv` row, and at evaluations the `routing.csv` rows of every sparse layer.
    fn write(&mut self, row: &MetricsRow, routing: &[(String, switch_model::RoutingStats)]) -> std::io::Result<()> {
        writeln!(self.metrics, "{row}")?;
        self.metrics.flush()?;
        for (layer, r) in routing {
            for (expert, &load) in r.load_fraction.iter().enumerate() {
                // Evaluation passes always measure the entropy; NaN would mark one that did not.
                let router_entropy = r.router_entropy.map_or(f64::NAN, |e| e as f64);
                let drop_fraction = r.drop_fraction as f64;
                let line = RoutingRow {
                    step: row.step,
                    layer,
                    expert,
                    load_fraction: load as f64,
                    drop_fraction,
                    router_entropy,
                };
                writeln!(self.routing, "{line}")?;
            }
        }
        self.routing.flush()
    }
}

/// Writes weights and optimizer state (per parameter: weights, m, v) as the run's checkpoint.
pub fn save_checkpoint(
    dir: &RunDir,
    model: &mut SwitchTransformer<Dev>,
    opt: &OptimizerState,
    step: u64,
    clock: &Clock,
) -> std::io::Result<()> {
    let mut w = dir.checkpoint_writer()?;
    for (i, (name, p)) in model.params_mut().into_iter().enumerate() {
        let [m, v] = opt.moments(i);
        w.tensor(name, &[&p.as_vec(), &m, &v])?;
    }
    w.finish(step, clock.wall_s(), clock.cpu_s())
}

/// Restores weights and optimizer state from the run's checkpoint, if it has one.
pub fn load_checkpoint(
    dir: &RunDir,
    model: &mut SwitchTransformer<Dev>,
    opt: &mut OptimizerState,
) -> Result<Option<rundir::CheckpointState>> {
    // Every problem names the file; the caller says how to go on.
    let fix = |e: &dyn std::fmt::Display| {
        Error::Training(format!("cannot read the checkpoint in {}: {e}", dir.path.join("checkpoint").display()))
    };
    let Some(mut r) = dir.checkpoint_reader().map_err(|e| fix(&e))? else { return Ok(None) };
    let mut params = model.params_mut();
    r.expect_tensors(params.len()).map_err(|e| fix(&e))?;
    for (i, (name, p)) in params.iter_mut().enumerate() {
        let n = p.shape().0;
        let floats = r.tensor(name, n, 3).map_err(|e| fix(&e))?;
        p.copy_from(&floats[..n]);
        opt.set_moments(i, &floats[n..2 * n], &floats[2 * n..]);
    }
    Ok(Some(r.state))
}

/// A run's model, optimizer and status at its last checkpoint (or fresh), marked `running`.
struct Resumed {
    model: SwitchTransformer<Dev>,
    opt: OptimizerState,
    status: Status,
    start_step: u64,
    clock: Clock,
}

/// A run's wall-clock and CPU seconds, counted on from its checkpoint's when it resumes.
pub struct Clock {
    started: Instant,
    wall_offset: f64,
    cpu_start: f64,
    cpu_offset: f64,
}

impl Clock {
    fn new(wall_offset: f64, cpu_offset: f64) -> Self {
        Clock { started: Instant::now(), wall_offset, cpu_start: crate::cputime::run_cpu_seconds(), cpu_offset }
    }
    pub fn wall_s(&self) -> f64 {
        self.wall_offset + self.started.elapsed().as_secs_f64()
    }
    /// CPU seconds of the run's own threads ([`crate::cputime`]).
    pub fn cpu_s(&self) -> f64 {
        self.cpu_offset + crate::cputime::run_cpu_seconds() - self.cpu_start
    }
}

/// `cfg`'s optimizer, its state sized from each parameter's shape.
pub fn optimizer_for(cfg: &RunConfig, model: &mut SwitchTransformer<Dev>) -> OptimizerState {
    let shapes: Vec<[usize; 3]> = model.params().iter().map(|p| p.shape).collect();
    OptimizerState::new(cfg.train.optimizer, &shapes).with_moments(cfg.train.optimizer_moments)
}

fn resume(cfg: &RunConfig, dir: &RunDir, dev: &Dev) -> Result<Resumed> {
    // dfdx's buffer cache: every step allocates the same shapes, so reusing freed buffers spares
    // the kernel a page fault per fresh page (the numbers are unchanged).
    dev.enable_cache();
    let mut model = SwitchTransformer::new(dev, &cfg.model, cfg.train.seed)?;
    let mut opt = optimizer_for(cfg, &mut model);
    let (on_disk, damaged) = match dir.status_file() {
        StatusFile::Damaged(problem) => {
            tracing::warn!("{problem}: kept as status.json.damaged; the run resumes from its checkpoint");
            (None, true)
        }
        StatusFile::Missing => (None, dir.had_damaged_status()),
        StatusFile::Readable(s) => (Some(s), dir.had_damaged_status()),
    };
    let (mut start_step, mut wall_offset, mut cpu_offset) = (0, 0.0, 0.0);
    let checkpoint = load_checkpoint(dir, &mut model, &mut opt).map_err(|e| {
        Error::Training(format!(
            "{e}. Delete {} to retrain this run from scratch",
            dir.path.join("checkpoint").display()
        ))
    })?;
    if let Some(ck) = &checkpoint {
        (start_step, wall_offset, cpu_offset) = (ck.step, ck.wall_s, ck.cpu_s);
    }
    // Starting over truncates the logs. Where the status was damaged, whether the run had
    // finished is unknown: keep its logs rather than train it again.
    let logged = dir.logged_rows();
    if checkpoint.is_none() && logged > 0 && damaged {
        return Err(Error::Training(format!(
            "{}: its status.json was damaged (kept as status.json.damaged) and there is no checkpoint to resume from, so whether it finished is unknown: its {logged} logged rows are kept and it is not retrained. To keep the run, write its state back into status.json; to retrain it, delete the folder",
            dir.path.display()
        )));
    }
    let mut status = on_disk.unwrap_or_else(|| {
        // A run resumed from a checkpoint without a status (set aside, or deleted) started when
        // its folder was made, not now: `started_at` orders runs of the same point and seed.
        let mut fresh = cfg.new_status();
        if checkpoint.is_some() {
            fresh.started_at = dir.created_at().unwrap_or(fresh.started_at);
        }
        fresh
    });
    dir.truncate_logs(start_step)?;
    status.state = State::Running;
    status.error = None;
    status.steps_done = start_step;
    dir.write_status(&status)?;
    Ok(Resumed { model, opt, status, start_step, clock: Clock::new(wall_offset, cpu_offset) })
}

/// Trains (or resumes) the run in `dir` to its last step. Errors and non-finite losses are
/// returned as `Err` for the caller to record as `failed`.
pub fn train(cfg: &RunConfig, ds: &Dataset, dir: &RunDir, stop: &AtomicBool, progress: Progress) -> Result<Outcome> {
    let dev = CacheOwner(Dev::default());
    train_on(&dev.0, cfg, ds, dir, stop, progress)
}

/// The run's device. Dropped after every tensor of the run (also when training panics), it
/// empties the device's buffer cache, which dfdx never frees on its own, so a sweep's process
/// does not keep every finished run's memory.
struct CacheOwner(Dev);

impl Drop for CacheOwner {
    fn drop(&mut self) {
        self.0.empty_cache();
    }
}

fn train_on(
    dev: &Dev,
    cfg: &RunConfig,
    ds: &Dataset,
    dir: &RunDir,
    stop: &AtomicBool,
    progress: Progress,
) -> Result<Outcome> {
    let t = &cfg.train;
    let Resumed { mut model, mut opt, mut status, start_step, clock } = resume(cfg, dir, dev)?;

    let (le, ld) = cfg.lengths();
    let tokens_per_step = (t.batch_size * (le + ld)) as u64;
    let mut logs = Logs { metrics: dir.metrics_writer()?, routing: dir.routing_writer()? };
    let mut window = (Instant::now(), start_step);
    let mut tokens_per_s = 0.0;

    for step in start_step..t.steps {
        let batch = to_batch(ds.train_batch(t.seed, step, t.batch_size), cfg);
        let (out, step_routing, lr) = train_step(&mut model, &mut opt, &batch, cfg, step)?;

        let done = step + 1;
        let last = done == t.steps;
        let drop_fraction = mean_drop_fraction(&step_routing);
        if done % t.eval_every == 0 || done % t.log_every == 0 || last {
            let (eval_loss, routing) = if done % t.eval_every == 0 || last {
                let (l, r) = evaluate(&model, ds, cfg, Split::Validation);
                (Some(l), r)
            } else {
                (None, vec![])
            };
            let row = MetricsRow {
                step: done,
                tokens: done * tokens_per_step,
                wall_s: clock.wall_s(),
                cpu_s: clock.cpu_s(),
                lr,
                train_loss: out.cross_entropy as f64,
                aux_loss: out.balance_loss as f64,
                z_loss: out.z_loss as f64,
                drop_fraction: drop_fraction as f64,
                eval_loss,
            };
            logs.write(&row, &routing)?;
            if let Some(l) = eval_loss {
                status.final_eval_loss = Some(l);
                status.final_eval_neg_log_perplexity = Some(-l);
            }
            status.final_train_loss = Some(out.cross_entropy as f64);
            let elapsed = window.0.elapsed().as_secs_f64();
            if elapsed > 0.0 {
                tokens_per_s = (done - window.1) as f64 * tokens_per_step as f64 / elapsed;
            }
            window = (Instant::now(), done);
            status.tokens_per_s = Some(tokens_per_s);
            progress(done, out.cross_entropy, tokens_per_s);
        }
        let stopping = stop.load(Ordering::SeqCst);
        if done % t.checkpoint_every == 0 || last || stopping {
            save_checkpoint(dir, &mut model, &opt, done, &clock)?;
            status.steps_done = done;
            dir.write_status(&status)?;
        }
        if stopping && !last {
            return Ok(Outcome::Interrupted);
        }
    }
    finish(&model, ds, cfg, dir, status, &clock)
}

/// The mean over sparse layers of the training batch's dropped fraction (0 for a dense model).
fn mean_drop_fraction(routing: &LayerRouting) -> f32 {
    if routing.is_empty() {
        return 0.0;
    }
    routing.iter().map(|(_, r)| r.drop_fraction).sum::<f32>() / routing.len() as f32
}

/// Scores the test split, once, after the last step (nothing during training or in choosing
/// settings reads it), and marks the run done. Its time is not training time, so the clocks are
/// read first.
fn finish(
    model: &SwitchTransformer<Dev>,
    ds: &Dataset,
    cfg: &RunConfig,
    dir: &RunDir,
    mut status: Status,
    clock: &Clock,
) -> Result<Outcome> {
    status.wall_s = Some(clock.wall_s());
    status.cpu_s = Some(clock.cpu_s());
    let (test_loss, _) = evaluate(model, ds, cfg, Split::Test);
    status.final_test_loss = Some(test_loss);
    status.final_test_neg_log_perplexity = Some(-test_loss);
    status.state = State::Done;
    status.steps_done = cfg.train.steps;
    status.finished_at = Some(rundir::now());
    dir.write_status(&status)?;
    Ok(Outcome::Done)
}
