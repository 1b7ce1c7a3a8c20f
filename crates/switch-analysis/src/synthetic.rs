//! Run folders whose answers are known by construction, written through the run-folder format
//! crate: for the report's tests and `switch-bench report`.
use std::path::Path;
use switch_rundir::{MetricsRow, RoutingRow, RunDir, RunFile, State, Status};

/// A run of `experts` experts (1 = dense) whose validation quality is `quality(step)` at every
/// `eval_every` steps, logged every `log_every` steps, with uniform routing; a done run's test
/// quality is its final validation quality − [`TEST_GAP`]. Wall-clock and CPU seconds are
/// step ÷ 10 and step ÷ 20.
pub struct SyntheticRun<'a> {
    pub id: &'a str,
    /// Grid keys the point sets besides the experts and the seed, as `(dotted key, value)`.
    pub setting: Vec<(&'a str, serde_json::Value)>,
    pub experts: u64,
    pub seed: u64,
    pub steps: u64,
    pub eval_every: u64,
    pub log_every: u64,
    pub batch_size: u64,
    pub state: State,
}

/// How much lower a synthetic run's test quality is than its final validation quality.
pub const TEST_GAP: f64 = 0.02;

impl<'a> SyntheticRun<'a> {
    /// Evaluated every 100 steps, logged every 10, batch 8, done.
    pub fn new(id: &'a str, experts: u64, seed: u64, steps: u64) -> Self {
        let (eval_every, log_every, batch_size) = (100, 10, 8);
        Self { id, setting: vec![], experts, seed, steps, eval_every, log_every, batch_size, state: State::Done }
    }

    /// Writes `sweep_dir/runs/<id>/` (config, status and both logs).
    pub fn write(&self, sweep_dir: &Path, quality: impl Fn(f64) -> f64) -> std::io::Result<()> {
        let dir = RunDir::new(sweep_dir.join("runs").join(self.id));
        dir.create(&self.run_file().yaml())?;
        let (mut metrics, mut routing) = (dir.metrics_writer()?, dir.routing_writer()?);
        use std::io::Write;
        for step in (self.log_every..=self.steps).step_by(self.log_every as usize) {
            let eval_loss = (step % self.eval_every == 0).then(|| -quality(step as f64));
            let (lr, aux_loss, z_loss, drop_fraction) = (0.001, 0.01, 0.0, 0.02);
            let (tokens, wall_s, cpu_s) = (step * 100, step as f64 / 10.0, step as f64 / 20.0);
            let train_loss = eval_loss.unwrap_or(3.0);
            let row =
                MetricsRow { step, tokens, wall_s, cpu_s, lr, train_loss, aux_loss, z_loss, drop_fraction, eval_loss };
            writeln!(metrics, "{row}")?;
            for expert in (0..self.experts as usize).filter(|_| eval_loss.is_some() && self.experts > 1) {
                let load_fraction = 1.0 / self.experts as f64;
                let (layer, drop_fraction, router_entropy) = ("encoder.1", 0.01, 0.5);
                writeln!(
                    routing,
                    "{}",
                    RoutingRow { step, layer, expert, load_fraction, drop_fraction, router_entropy }
                )?;
            }
        }
        metrics.flush()?;
        routing.flush()?;
        let test = (self.state == State::Done).then(|| quality(self.steps as f64) - TEST_GAP);
        dir.write_status(&Status {
            state: self.state,
            steps_done: self.steps,
            final_test_neg_log_perplexity: test,
            final_test_loss: test.map(|q| -q),
            ..Default::default()
        })
    }

    fn run_file(&self) -> RunFile<serde_json::Value> {
        let mut point = serde_json::Map::new();
        point.insert("model.num_experts".into(), self.experts.into());
        for (k, v) in &self.setting {
            point.insert(k.to_string(), v.clone());
        }
        point.insert("train.seed".into(), self.seed.into());
        let mut config = serde_json::json!({
            "model": {"num_experts": self.experts, "top_k": 1, "capacity_factor": 1.25, "init_scale": 0.1},
            "train": {"steps": self.steps, "batch_size": self.batch_size, "seed": self.seed},
        });
        // The resolved config holds the point's settings too, as a sweep's does.
        for (key, v) in &self.setting {
            let (section, field) = key.split_once('.').expect("a dotted key");
            config[section][field] = v.clone();
        }
        RunFile {
            run_id: self.id.into(),
            sweep: "synthetic".into(),
            is_baseline: self.experts == 1,
            point,
            params_total: 1000 * self.experts,
            params_active: 1000,
            flops_per_token: 5000.0,
            flops_per_token_computed: 5000.0 + 100.0 * self.experts as f64,
            config,
        }
    }
}
