//! Reading a sweep's run folders: `config.yaml` and `status.json` per run, and every run's
//! `metrics.csv` / `routing.csv` through one Polars lazy query each. Missing or truncated files
//! mark the run, never stop the report.
use polars::prelude::*;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use switch_rundir::{State, StatusFile};

/// One evaluation point of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalPoint {
    pub step: f64,
    pub wall_s: f64,
    /// CPU seconds of the run's own threads (0 in logs written before the column existed).
    pub cpu_s: f64,
    pub neg_log_perplexity: f64,
    pub drop_fraction: f64,
}

/// Routing statistics of one layer at one evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingRow {
    pub step: f64,
    pub layer: String,
    pub load_fraction: f64,
    pub drop_fraction: f64,
    /// Mean over tokens of the router distribution's entropy (nats); ln E = a uniform router.
    pub router_entropy: f64,
}

#[derive(Clone, Debug)]
pub struct Run {
    pub id: String,
    /// Grid keys of the point, seed excluded, as `key=value` (the group of seeds).
    pub group: String,
    /// The grid keys the point sets, as in `config.yaml` (seed included): what claims select.
    pub point: serde_json::Map<String, Value>,
    /// The fully resolved config (`Null` when `config.yaml` is unreadable).
    pub config: Value,
    /// False when `config.yaml` cannot be read: the run's model and point are unknown, so it is
    /// listed with its problem but left out of every group and comparison.
    pub config_readable: bool,
    /// The group minus the number of experts, as `key=value` items: the setting a Switch point
    /// shares with its dense comparison in a lever study (empty in a plain experts sweep).
    pub variant_items: Vec<String>,
    pub seed: u64,
    /// `None` when `status.json` is missing or unreadable.
    pub state: Option<State>,
    pub error: Option<String>,
    pub is_baseline: bool,
    pub num_experts: u64,
    pub top_k: u64,
    pub capacity_factor: f64,
    /// `model.d_model` as resolved (0 when the config lacks it).
    pub d_model: u64,
    /// `model.d_ff` as resolved (0 when the config lacks it).
    pub d_ff: u64,
    pub init_scale: f64,
    pub batch_size: u64,
    pub steps_total: u64,
    pub params_total: u64,
    pub params_active: u64,
    /// FLOPs per token by the paper's convention (the match rule).
    pub flops_per_token: f64,
    /// FLOPs per token the engine computed: router and every capacity slot (0 when unknown).
    pub flops_per_token_computed: f64,
    /// Test-split quality, scored once at the end of a done run.
    pub test_quality: Option<f64>,
    /// e.g. "2048-entry bpe".
    pub vocabulary: String,
    /// "the embedded public-domain corpus" or the user corpus path.
    pub corpus: String,
    /// The training objective, in words ("T5-style span corruption", "a prefix LM …").
    pub objective: String,
    /// The CPU kernels that trained it (`train.kernels`; `None` in configs older than the key).
    pub kernels: Option<String>,
    pub curve: Vec<EvalPoint>,
    pub final_step: f64,
    pub final_wall_s: f64,
    pub final_cpu_s: f64,
    pub final_tokens: f64,
    pub routing: Vec<RoutingRow>,
    /// The first evaluation step whose quality was NaN or infinite.
    pub diverged_at: Option<f64>,
    /// What is wrong with the run's files, if anything: each problem names its file (metrics
    /// missing, a config or log that cannot be read), joined by `; `.
    pub problem: Option<String>,
    /// When `status.json` says the run started (0 when unknown).
    pub started_at: f64,
    /// Another run of the same point and seed that started later, which the tables use instead:
    /// this one was trained by other code or settings (a results version, a changed default).
    pub superseded_by: Option<String>,
}

impl Run {
    /// Whether the report's tables, figures and summary use this run: its config is readable and
    /// no later run of its point and seed supersedes it.
    pub fn compared(&self) -> bool {
        self.config_readable && self.superseded_by.is_none()
    }
    /// The lever-study setting as one label, e.g. `learning_rate=0.01 expert_every=1`.
    pub fn variant(&self) -> String {
        self.variant_items.join(" ")
    }
    /// The setting without the feed-forward width: what a dense model of any width shares with
    /// the Switch models of its width-ceiling comparison.
    pub fn setting_without_width(&self) -> Vec<&str> {
        let mut items: Vec<&str> =
            self.variant_items.iter().map(String::as_str).filter(|i| !i.starts_with("d_ff=")).collect();
        items.sort_unstable();
        items
    }
    /// Done, and its log holds the evaluation at its last step (as every finished run writes
    /// one): the tables can read its final quality.
    pub fn finished(&self) -> bool {
        self.state == Some(State::Done) && self.curve.last().is_some_and(|p| p.step >= self.steps_total as f64)
    }
    /// The state as the report prints it (`unknown` without a readable `status.json`).
    pub fn state_label(&self) -> String {
        self.state.map_or("unknown".into(), |s| s.to_string())
    }
    pub fn nlp_curve(&self) -> Vec<(f64, f64)> {
        self.curve.iter().map(|p| (p.step, p.neg_log_perplexity)).collect()
    }
    /// CPU seconds at `step`, interpolated between evaluations (`None` outside them).
    pub fn cpu_at(&self, step: f64) -> Option<f64> {
        crate::stats::interpolate(&self.curve.iter().map(|p| (p.step, p.cpu_s)).collect::<Vec<_>>(), step)
    }
    /// `(CPU seconds, quality)` at each evaluation.
    pub fn cpu_curve(&self) -> Vec<(f64, f64)> {
        self.curve.iter().map(|p| (p.cpu_s, p.neg_log_perplexity)).collect()
    }
    pub fn final_quality(&self) -> Option<f64> {
        self.curve.last().map(|p| p.neg_log_perplexity)
    }
    /// Tokens per CPU second of the run's own threads.
    pub fn tokens_per_s(&self) -> Option<f64> {
        (self.final_cpu_s > 0.0).then(|| self.final_tokens / self.final_cpu_s)
    }
    /// Examples per CPU second of the run's own threads.
    pub fn examples_per_s(&self) -> Option<f64> {
        (self.final_cpu_s > 0.0).then(|| self.final_step * self.batch_size as f64 / self.final_cpu_s)
    }
    /// "Switch-8", "MoE-8 (top-2)" or "Dense".
    pub fn model_name(&self) -> String {
        match (self.num_experts, self.top_k) {
            (1, _) => "Dense".into(),
            (e, 1) => format!("Switch-{e}"),
            (e, k) => format!("MoE-{e} (top-{k})"),
        }
    }
}

pub(crate) fn get<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

/// A Polars schema over a CSV header of the run-folder format: integer step (and expert),
/// string layer, floats elsewhere.
fn schema(header: &str) -> SchemaRef {
    let dtype = |name: &str| match name {
        "step" | "expert" => DataType::Int64,
        "layer" => DataType::String,
        _ => DataType::Float64,
    };
    Arc::new(Schema::from_iter(header.split(',').map(|n| Field::new(n.into(), dtype(n)))))
}

fn metrics_schema() -> SchemaRef {
    schema(switch_rundir::METRICS_HEADER)
}

fn routing_schema() -> SchemaRef {
    schema(switch_rundir::ROUTING_HEADER)
}

/// The first `rows` data rows of a CSV log, tagged with the run id.
fn scan(path: &Path, schema: SchemaRef, run_id: &str, rows: usize) -> LazyFrame {
    LazyCsvReader::new(PlRefPath::from(path.to_string_lossy().as_ref()))
        .with_has_header(true)
        .with_n_rows(Some(rows))
        .with_schema(Some(schema))
        .with_ignore_errors(true)
        .with_truncate_ragged_lines(true)
        .finish()
        .map(|lf| lf.with_column(lit(run_id.to_string()).alias("run_id")))
        .unwrap_or_else(|_| DataFrame::empty().lazy())
}

fn f64s(df: &DataFrame, name: &str) -> PolarsResult<Vec<Option<f64>>> {
    Ok(df.column(name)?.cast(&DataType::Float64)?.f64()?.iter().collect())
}

fn strs(df: &DataFrame, name: &str) -> PolarsResult<Vec<String>> {
    Ok(df.column(name)?.str()?.iter().map(|s| s.unwrap_or_default().to_string()).collect())
}

/// The number of complete data rows of a log: a last line without its newline is a write cut
/// short (a killed run) and is left out, however much of it parses.
fn complete_rows(path: &Path) -> Result<usize, String> {
    let name = || path.file_name().unwrap_or_default().to_string_lossy().to_string();
    let text = std::fs::read(path).map_err(|_| format!("{} is missing", name()))?;
    let lines = text.iter().filter(|&&b| b == b'\n').count();
    if lines < 2 {
        return Err(format!("{} has no rows", name()));
    }
    Ok(lines - 1)
}

/// Loads every run folder under `sweep_dir/runs`, sorted by (baseline first, experts, group, seed).
/// A run as its `config.yaml` and `status.json` describe it, before its logs are read.
fn run_from_folder(dir: &Path, id: String) -> Run {
    let (file, mut problem) = match switch_rundir::RunFile::<Value>::read(&dir.join("config.yaml")) {
        Ok(f) => (Some(f), None),
        Err(e) => (None, Some(format!("{e}; left out of comparisons (restore config.yaml or remove the run folder)"))),
    };
    let cfg = file.as_ref().map_or(&Value::Null, |f| &f.config);
    let status = match switch_rundir::RunDir::new(dir).status_file() {
        StatusFile::Readable(s) => Some(s),
        StatusFile::Missing => None,
        StatusFile::Damaged(e) => {
            let next = if dir.join("checkpoint").exists() {
                "the next sweep resumes it from its checkpoint and writes a new status.json, keeping this one as status.json.damaged"
            } else {
                "with no checkpoint to resume from, the next sweep keeps its logs and marks it failed: write its state back into status.json, or delete the folder to retrain it"
            };
            let damaged = format!("{e}: its state and test score are unknown ({next})");
            problem = Some(problem.map_or(damaged.clone(), |p| format!("{p}; {damaged}")));
            None
        }
    };
    let num = |v: &Value, p: &str| get(v, p).and_then(Value::as_f64);
    let point = file.as_ref().map(|f| f.point.clone()).unwrap_or_default();
    let items = |skip: &[&str]| {
        point
            .iter()
            // A zipped `null` leaves an option unset: the default, not a setting of its own.
            .filter(|(k, v)| !skip.contains(&k.as_str()) && !v.is_null())
            .map(|(k, v)| format!("{}={}", k.rsplit('.').next().unwrap_or(k), v))
            .collect::<Vec<_>>()
    };
    let group = match items(&["train.seed"]).join(" ") {
        _ if file.is_none() => "? (config.yaml unreadable)".into(),
        g if g.is_empty() => "base".into(),
        g => g,
    };
    let variant_items = items(&["train.seed", "model.num_experts"]);
    Run {
        id,
        group,
        point: point.clone(),
        config: cfg.clone(),
        config_readable: file.is_some(),
        variant_items,
        seed: num(cfg, "train.seed").unwrap_or(0.0) as u64,
        state: status.as_ref().map(|s| s.state),
        error: status.as_ref().and_then(|s| s.error.clone()),
        is_baseline: file.as_ref().is_some_and(|f| f.is_baseline),
        num_experts: num(cfg, "model.num_experts").unwrap_or(1.0) as u64,
        top_k: num(cfg, "model.top_k").unwrap_or(1.0) as u64,
        capacity_factor: num(cfg, "model.capacity_factor").unwrap_or(0.0),
        d_model: num(cfg, "model.d_model").unwrap_or(0.0) as u64,
        d_ff: num(cfg, "model.d_ff").unwrap_or(0.0) as u64,
        init_scale: num(cfg, "model.init_scale").unwrap_or(0.0),
        batch_size: num(cfg, "train.batch_size").unwrap_or(0.0) as u64,
        steps_total: num(cfg, "train.steps").unwrap_or(0.0) as u64,
        params_total: file.as_ref().map_or(0, |f| f.params_total),
        params_active: file.as_ref().map_or(0, |f| f.params_active),
        flops_per_token: file.as_ref().map_or(0.0, |f| f.flops_per_token),
        flops_per_token_computed: file.as_ref().map_or(0.0, |f| f.flops_per_token_computed),
        test_quality: status.as_ref().and_then(|s| s.final_test_neg_log_perplexity),
        vocabulary: format!(
            "{}-entry {}",
            num(cfg, "model.vocab_size").unwrap_or(0.0),
            get(cfg, "data.tokenizer").and_then(Value::as_str).unwrap_or("?")
        ),
        corpus: match get(cfg, "data.corpus").and_then(Value::as_str) {
            Some("default") | None => "the embedded public-domain books and Brown corpus (19 MB)".into(),
            Some(path) => format!("the corpus `{path}`"),
        },
        objective: match get(cfg, "data.objective").and_then(Value::as_str) {
            Some("span_corruption") | None => "T5-style span corruption".into(),
            Some("prefix_lm") => "a prefix LM (NOT the paper's span corruption)".into(),
            Some("causal_lm") => "a decoder-only causal LM (NOT the paper's objective or model)".into(),
            Some(other) => format!("the `{other}` objective"),
        },
        kernels: get(cfg, "train.kernels").and_then(Value::as_str).map(String::from),
        curve: vec![],
        final_step: 0.0,
        final_wall_s: 0.0,
        final_cpu_s: 0.0,
        final_tokens: 0.0,
        routing: vec![],
        diverged_at: None,
        problem,
        started_at: status.as_ref().map_or(0.0, |s| s.started_at),
        superseded_by: None,
    }
}

/// Marks every run that shares its point and seed with a run that started later (ties: the
/// larger id) as superseded by it, so a sweep re-run into a folder that holds runs of earlier
/// code counts each seed once.
fn mark_superseded(runs: &mut [Run]) {
    // The newest readable run of each point and seed, in one pass (sweeps reach thousands of runs).
    let mut newest: HashMap<(&str, u64), &Run> = HashMap::new();
    for r in runs.iter().filter(|r| r.config_readable) {
        let latest = newest.entry((r.group.as_str(), r.seed)).or_insert(r);
        if r.started_at.total_cmp(&latest.started_at).then(r.id.cmp(&latest.id)).is_gt() {
            *latest = r;
        }
    }
    let superseded: Vec<(usize, String)> = runs
        .iter()
        .enumerate()
        .filter(|(_, r)| r.config_readable)
        .filter_map(|(i, r)| {
            let newer = &newest[&(r.group.as_str(), r.seed)].id;
            (*newer != r.id).then(|| (i, newer.clone()))
        })
        .collect();
    for (i, newer) in superseded {
        note_problem(&mut runs[i], format!("superseded by {newer} (the same point and seed, started later); left out of comparisons (remove the folder to drop it)"));
        runs[i].superseded_by = Some(newer);
    }
}

/// Adds `problem` to the run `id`'s problems.
fn add_problem(runs: &mut [Run], id: &str, problem: String) {
    if let Some(r) = runs.iter_mut().find(|r| r.id == id) {
        note_problem(r, problem);
    }
}

/// Adds `problem` to `r`'s problems.
fn note_problem(r: &mut Run, problem: String) {
    r.problem = Some(match r.problem.take() {
        Some(p) => format!("{p}; {problem}"),
        None => problem,
    });
}

/// Every run's rows of one log (`file`, e.g. `routing.csv`) as one frame; `None` when none has
/// rows. The logs are read together, and only when that fails one by one: a file Polars cannot
/// parse (not UTF-8, say) then marks its own run, naming the file, and the others are still read,
/// so one bad log never stops the whole report.
fn read_logs(runs: &mut [Run], frames: Vec<(String, LazyFrame)>, file: &str) -> anyhow::Result<Option<DataFrame>> {
    let together = |frames: Vec<LazyFrame>| concat(frames, UnionArgs::default())?.collect();
    if frames.is_empty() {
        return Ok(None);
    }
    if let Ok(all) = together(frames.iter().map(|(_, f)| f.clone()).collect()) {
        return Ok(Some(all));
    }
    let mut good = Vec::new();
    for (id, frame) in frames {
        match frame.collect() {
            Ok(df) => good.push(df.lazy()),
            Err(e) => add_problem(runs, &id, format!("{file} cannot be parsed ({e}); its rows are left out")),
        }
    }
    Ok(if good.is_empty() { None } else { Some(together(good)?) })
}

/// Each run's last logged step, tokens and wall time, and its evaluation curve.
fn attach_metrics(runs: &mut [Run], all: DataFrame) -> anyhow::Result<()> {
    let all = all.lazy();
    // Last logged row of each run: steps, tokens and wall time so far.
    let last = all
        .clone()
        .group_by([col("run_id")])
        .agg([
            col("step").max().alias("step"),
            col("tokens").max().alias("tokens"),
            col("wall_s").max().alias("wall_s"),
            col("cpu_s").max().alias("cpu_s"),
        ])
        .collect()?;
    let (ids, steps, tokens) = (strs(&last, "run_id")?, f64s(&last, "step")?, f64s(&last, "tokens")?);
    let (walls, cpus) = (f64s(&last, "wall_s")?, f64s(&last, "cpu_s")?);
    for (i, id) in ids.iter().enumerate() {
        if let Some(r) = runs.iter_mut().find(|r| &r.id == id) {
            (r.final_step, r.final_tokens) = (steps[i].unwrap_or(0.0), tokens[i].unwrap_or(0.0));
            (r.final_wall_s, r.final_cpu_s) = (walls[i].unwrap_or(0.0), cpus[i].unwrap_or(0.0));
        }
    }
    let evals = all
        .clone()
        .filter(col("eval_neg_log_perplexity").is_not_null())
        .sort(["run_id", "step"], SortMultipleOptions::default())
        .collect()?;
    let (ids, steps, walls, cpus, nlp, drops) = (
        strs(&evals, "run_id")?,
        f64s(&evals, "step")?,
        f64s(&evals, "wall_s")?,
        f64s(&evals, "cpu_s")?,
        f64s(&evals, "eval_neg_log_perplexity")?,
        f64s(&evals, "drop_fraction")?,
    );
    for i in 0..ids.len() {
        let Some(r) = runs.iter_mut().find(|r| r.id == ids[i]) else { continue };
        if let (Some(step), Some(q)) = (steps[i], nlp[i]) {
            // A diverged run logs NaN or ±inf: its curve stops at its last finite evaluation,
            // and the run is marked, so no table or figure computes with a non-finite number.
            if !q.is_finite() || r.diverged_at.is_some() {
                r.diverged_at = r.diverged_at.or(Some(step));
                continue;
            }
            // A perplexity is at least 1: a positive neg log perplexity was not written by a run.
            if q > 0.0 {
                note_problem(r, format!("metrics.csv: the evaluation at step {step} reads eval_neg_log_perplexity {q:e}, impossible (a perplexity is at least 1, so it is ≤ 0): the file is damaged and that evaluation is left out"));
                continue;
            }
            r.curve.push(EvalPoint {
                step,
                wall_s: walls[i].unwrap_or(0.0),
                cpu_s: cpus[i].filter(|c| c.is_finite()).unwrap_or(0.0),
                neg_log_perplexity: q,
                drop_fraction: drops[i].unwrap_or(0.0),
            });
        }
    }
    // Every row logs these: an empty one is a cell that did not parse as a number.
    let logged = ["step", "tokens", "wall_s", "lr", "train_loss"];
    let unreadable = all
        .filter(logged.iter().map(|c| col(*c).is_null()).reduce(|a, b| a.or(b)).expect("columns"))
        .group_by([col("run_id")])
        .agg([len().alias("rows")])
        .collect()?;
    for (id, rows) in strs(&unreadable, "run_id")?.into_iter().zip(f64s(&unreadable, "rows")?) {
        let rows = rows.unwrap_or(0.0);
        add_problem(runs, &id, format!("metrics.csv: {rows} row(s) with a value that is not a number (the file is damaged); those values are left out"));
    }
    Ok(())
}

/// Each run's routing rows.
fn attach_routing(runs: &mut [Run], all: DataFrame) -> anyhow::Result<()> {
    let all = all.lazy().filter(col("load_fraction").is_not_null()).collect()?;
    let (ids, steps, layers, loads, drops, entropies) = (
        strs(&all, "run_id")?,
        f64s(&all, "step")?,
        strs(&all, "layer")?,
        f64s(&all, "load_fraction")?,
        f64s(&all, "drop_fraction")?,
        f64s(&all, "router_entropy")?,
    );
    for i in 0..ids.len() {
        if let Some(r) = runs.iter_mut().find(|r| r.id == ids[i]) {
            r.routing.push(RoutingRow {
                step: steps[i].unwrap_or(0.0),
                layer: layers[i].clone(),
                load_fraction: loads[i].unwrap_or(0.0),
                drop_fraction: drops[i].unwrap_or(0.0),
                router_entropy: entropies[i].unwrap_or(f64::NAN),
            });
        }
    }
    Ok(())
}

pub fn load(sweep_dir: &Path) -> anyhow::Result<Vec<Run>> {
    let runs_dir = sweep_dir.join("runs");
    let mut dirs: Vec<_> = std::fs::read_dir(&runs_dir)
        .map_err(|e| {
            anyhow::anyhow!("{}: cannot list runs ({e}); is this a sweep folder (results/<sweep>)?", runs_dir.display())
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.yaml").exists())
        .collect();
    dirs.sort();
    let mut runs = Vec::new();
    let (mut metric_frames, mut routing_frames) = (Vec::new(), Vec::new());
    for dir in &dirs {
        let id = dir.file_name().unwrap_or_default().to_string_lossy().to_string();
        let mut problem = None;
        match complete_rows(&dir.join("metrics.csv")) {
            Ok(rows) => metric_frames.push((id.clone(), scan(&dir.join("metrics.csv"), metrics_schema(), &id, rows))),
            Err(e) => problem = Some(e),
        }
        if let Ok(rows) = complete_rows(&dir.join("routing.csv")) {
            routing_frames.push((id.clone(), scan(&dir.join("routing.csv"), routing_schema(), &id, rows)));
        }
        let mut run = run_from_folder(dir, id);
        run.problem = run.problem.or(problem);
        runs.push(run);
    }
    if let Some(all) = read_logs(&mut runs, metric_frames, "metrics.csv")? {
        attach_metrics(&mut runs, all)?;
    }
    if let Some(all) = read_logs(&mut runs, routing_frames, "routing.csv")? {
        attach_routing(&mut runs, all)?;
    }
    for r in &mut runs {
        if r.problem.is_none() && r.curve.is_empty() {
            r.problem = Some("no evaluation yet".into());
        }
    }
    // A done run evaluates at its last step; a log that stops short was cut after the run ended.
    for r in runs.iter_mut().filter(|r| r.state == Some(State::Done) && !r.finished()) {
        let (Some(step), total) = (r.curve.last().map(|p| p.step), r.steps_total) else { continue };
        note_problem(r, format!("done, but metrics.csv has no usable evaluation at its last step ({total}), which every finished run logs: the file was damaged or cut short after the run finished (restore it); the tables mark the run unfinished and use step {step}'s evaluation"));
    }
    mark_superseded(&mut runs);
    runs.sort_by(|a, b| {
        (!a.is_baseline, a.top_k, a.num_experts, a.group.clone(), a.seed).cmp(&(
            !b.is_baseline,
            b.top_k,
            b.num_experts,
            b.group.clone(),
            b.seed,
        ))
    });
    Ok(runs)
}
