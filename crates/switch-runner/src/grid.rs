//! Experiment grids (`experiments/*.yaml`): expansion into resolved runs, with FLOPs per token
//! checked or solved before anything trains.
use crate::config::{explain_yaml_error, merge, set_dotted, typed, RunConfig};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// How a grid treats FLOPs per token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged, try_from = "Value")]
pub enum FlopsRule {
    /// `match_baseline` (refuse points whose FLOPs per token differ from the baseline's, router
    /// aside) or `free` (deliberate mismatches, e.g. a T5-Large row).
    Mode(FlopsMode),
    /// `{solve: model.d_model}`: for each selected point (default: every non-baseline point), find
    /// the integer value of the key that matches the target's FLOPs (default: the baseline's).
    Solve {
        solve: String,
        #[serde(default)]
        points: Option<Map<String, Value>>,
        #[serde(default)]
        target: Option<Map<String, Value>>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlopsMode {
    MatchBaseline,
    Free,
}

/// Parsed by hand so that a typo inside `{solve: …}` is refused with a hint, not ignored (an
/// untagged enum ignores unknown fields).
impl TryFrom<Value> for FlopsRule {
    type Error = String;
    fn try_from(v: Value) -> std::result::Result<Self, String> {
        const FIELDS: [&str; 3] = ["solve", "points", "target"];
        let allowed = "match_baseline, free or {solve: model.d_model | model.d_ff, points: {…}, target: {…}}";
        let m = match v {
            Value::String(s) if s == "match_baseline" => return Ok(Self::Mode(FlopsMode::MatchBaseline)),
            Value::String(s) if s == "free" => return Ok(Self::Mode(FlopsMode::Free)),
            Value::Object(m) => m,
            other => return Err(format!("flops_per_token: `{other}` is not one of {allowed}")),
        };
        if let Some(k) = m.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            let hint = FIELDS.iter().min_by_key(|f| crate::config::edit_distance(k, f)).expect("non-empty");
            return Err(format!(
                "flops_per_token: unknown field `{k}`; did you mean `{hint}`? (allowed: solve, points, target)"
            ));
        }
        let selector = |key: &str| match m.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(o)) => Ok(Some(o.clone())),
            Some(other) => Err(format!("flops_per_token.{key}: `{other}` is not a point selector ({{key: value, …}})")),
        };
        let solve = match m.get("solve") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(format!("flops_per_token: `solve` is required in a map (expected {allowed})")),
        };
        Ok(Self::Solve { solve, points: selector("points")?, target: selector("target")? })
    }
}

/// A grid file as written by the user.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GridFile {
    pub name: Option<String>,
    pub description: Option<String>,
    /// A preset in `experiments/presets/<base>.yaml` (next to the grid's folder).
    pub base: Option<String>,
    /// Inline settings, applied over the preset.
    pub settings: Option<Map<String, Value>>,
    /// Cartesian product over dotted keys.
    #[serde(default)]
    pub grid: Map<String, Value>,
    /// Lists of equal length that vary together.
    #[serde(default)]
    pub zip: Map<String, Value>,
    /// Extra points added to the product.
    #[serde(default)]
    pub points: Vec<Map<String, Value>>,
    #[serde(default)]
    pub exclude: Vec<Map<String, Value>>,
    pub seeds: Option<Vec<u64>>,
    /// Selects the dense row every table and plot compares against.
    pub baseline: Option<Map<String, Value>>,
    pub flops_per_token: Option<FlopsRule>,
    /// Relative FLOPs tolerance of `match_baseline` and `solve` (default 0.01).
    pub tolerance: Option<f64>,
    /// Cluster settings for `--backend slurm`.
    pub slurm: Option<crate::cluster::SlurmConfig>,
    /// What the grid expects its runs to show, judged by the report on the test split.
    #[serde(default)]
    pub claims: Vec<switch_rundir::claims::Claim>,
    /// The most runs (points × seeds) the grid may expand to (default [`MAX_RUNS`]).
    pub max_runs: Option<usize>,
}

/// Default bound on a grid's runs: far above any sweep one machine trains, far below what
/// exhausts memory while expanding.
pub const MAX_RUNS: usize = 10_000;

/// One run of a sweep, fully resolved.
#[derive(Clone, Debug, Serialize)]
pub struct PlannedRun {
    pub run_id: String,
    /// The grid keys this point sets (seed included), in grid order.
    pub point: Map<String, Value>,
    pub is_baseline: bool,
    pub config: RunConfig,
    pub accounting: switch_model::Accounting,
    /// FLOPs per token ÷ the baseline's.
    pub flops_ratio: f64,
    /// Estimated peak memory of this run trained alone, bytes ([`memory_bytes`]).
    pub memory: f64,
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub name: String,
    pub path: PathBuf,
    pub runs: Vec<PlannedRun>,
    pub slurm: Option<crate::cluster::SlurmConfig>,
}

/// `config.yaml` of one of this runner's run folders.
pub type RunFile = switch_rundir::RunFile<RunConfig>;

impl Plan {
    /// The `config.yaml` of planned run `r`.
    pub fn run_file(&self, r: &PlannedRun) -> RunFile {
        RunFile {
            run_id: r.run_id.clone(),
            sweep: self.name.clone(),
            is_baseline: r.is_baseline,
            point: r.point.clone(),
            params_total: r.accounting.params_total,
            params_active: r.accounting.params_active,
            flops_per_token: r.accounting.flops_per_token,
            flops_per_token_computed: r.config.computed_flops_per_token(),
            config: r.config.clone(),
        }
    }

    /// The runs still to train in `sweep_dir` (in plan order), and every run's triage.
    pub fn pending(&self, sweep_dir: &Path, retry_failed: bool) -> (Vec<&PlannedRun>, switch_rundir::Triage) {
        let triage =
            switch_rundir::triage(&sweep_dir.join("runs"), self.runs.iter().map(|r| r.run_id.as_str()), retry_failed);
        (self.runs.iter().filter(|r| triage.pending.contains(&r.run_id)).collect(), triage)
    }
}

/// A grid problem, naming the file and what to change.
fn err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::input(path, msg)
}

/// Whether a point sets every key of `selector` to its value; a `null` in the selector matches
/// a point that leaves the key unset (e.g. `baseline: {model.num_experts: 1, model.d_ff: null}`
/// picks the dense point of the preset's width, not a wider one).
fn matches(point: &Map<String, Value>, selector: &Map<String, Value>) -> bool {
    switch_rundir::claims::selector_matches(point, selector)
}

/// Refuses a selector (`what`: where it is written, e.g. `exclude[0]`) with a key that is no
/// config key, or that matches none of `points`: a typo there would otherwise select nothing.
fn check_selector(path: &Path, what: &str, selector: &Map<String, Value>, points: &[Map<String, Value>]) -> Result<()> {
    let keys = crate::config::valid_keys();
    if let Some(k) = selector.keys().find(|k| *k != "train.seed" && !keys.contains(k)) {
        let hint = crate::config::closest_key(k);
        return Err(err(path, format!("{what}: unknown key `{k}`; did you mean `{hint}`?")));
    }
    if !points.iter().any(|p| matches(p, selector)) {
        let example = points.first().map(|p| Value::Object(p.clone()).to_string()).unwrap_or_default();
        return Err(err(
            path,
            format!(
                "{what} {} matches no point of the grid. Fix: use the keys and values the points set (e.g. {example}); `null` matches a point that leaves a key unset",
                Value::Object(selector.clone())
            ),
        ));
    }
    Ok(())
}

/// Checks every claim's numbers and selectors against the planned points (after solving, so
/// they select what the report will see).
fn check_claims(path: &Path, claims: &[switch_rundir::claims::Claim], points: &[Map<String, Value>]) -> Result<()> {
    for (i, c) in claims.iter().enumerate() {
        if let Some(p) = c.problems().first() {
            return Err(err(path, format!("claims[{i}] (\"{}\"): {p}", c.says)));
        }
        for (name, sel, single) in c.selectors() {
            let what = format!("claims[{i}].{name}");
            check_selector(path, &what, sel, points)?;
            let n = points.iter().filter(|p| matches(p, sel)).count();
            if single && n > 1 {
                return Err(err(path, format!("{what} {} matches {n} points; it must name one. Fix: add keys (`null` matches a point that leaves a key unset)", Value::Object(sel.clone()))));
            }
        }
        if let switch_rundir::claims::ClaimTest::ImprovesWith(w) = &c.test {
            if !crate::config::valid_keys().contains(&w.key) {
                let hint = crate::config::closest_key(&w.key);
                return Err(err(
                    path,
                    format!("claims[{i}].improves_with.key: unknown key `{}`; did you mean `{hint}`?", w.key),
                ));
            }
        }
    }
    Ok(())
}

fn list<'a>(path: &Path, section: &str, key: &str, v: &'a Value) -> Result<&'a Vec<Value>> {
    match v.as_array() {
        Some(l) if !l.is_empty() => Ok(l),
        _ => Err(err(path, format!("{section}.{key} must be a non-empty list of values, e.g. `{key}: [1, 2]`"))),
    }
}

/// Bumped whenever the code changes what a config trains to (init, numerics), so that a sweep
/// never resumes or reuses a run folder written by code that gives different results.
/// 2: per-group init streams (paired seeds). 3: fused RMSNorm (floating-point order).
/// 4: gemm 0.19 products and fused cross-entropy (floating-point order). 5: fused attention,
/// the gradient norm summed in eight lanes. 6: the softmax's vectorised `exp` (within 1.2 ulp of
/// libm's) and eight-lane sum. 7: train / validation / test splits (the test split leaves the
/// training text; the tokenizer is trained on what remains).
pub const RESULTS_VERSION: u32 = 7;

/// The run id: a short stable hash of the resolved config's identity (seed included, see
/// [`identity`]) and [`RESULTS_VERSION`].
pub fn run_id(cfg: &RunConfig) -> String {
    let json = identity(cfg).to_string();
    format!("{:012x}", switch_data::fnv1a(format!("results-v{RESULTS_VERSION} {json}").as_bytes()) >> 16)
}

/// The keys every run id has hashed since version 7, at any value. Frozen: a key added to the
/// config later enters the hash only where a run sets it away from its default, so adding a
/// field never changes an existing run id. (At the next `RESULTS_VERSION` bump every id changes
/// anyway; this list can then be emptied.)
pub const ALWAYS_HASHED: [(&str, &[&str]); 3] = [
    (
        "model",
        &[
            "vocab_size",
            "d_model",
            "d_ff",
            "num_heads",
            "d_kv",
            "num_encoder_layers",
            "num_decoder_layers",
            "activation",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
            "num_experts",
            "top_k",
            "expert_every",
            "capacity_factor",
            "eval_capacity_factor",
            "min_expert_capacity",
            "routing_priority",
            "balance_loss_coef",
            "z_loss_coef",
            "router_loss_reduction",
            "jitter_eps",
            "init_scale",
            "dropout",
            "expert_dropout",
        ],
    ),
    (
        "data",
        &[
            "corpus",
            "tokenizer",
            "vocab_size",
            "num_sentinels",
            "encoder_len",
            "noise_density",
            "mean_noise_span_len",
            "held_out_fraction",
            "eval_examples",
        ],
    ),
    (
        "train",
        &[
            "steps",
            "batch_size",
            "learning_rate",
            "warmup_steps",
            "schedule",
            "weight_decay",
            "beta1",
            "beta2",
            "grad_clip",
            "eval_every",
            "log_every",
            "checkpoint_every",
            "seed",
            "eval_batch_size",
        ],
    ),
];

/// The values [`identity`] leaves out: what a config whose sections name no key reads as. That is
/// today's default for every field except one whose default changed within results version 7:
/// its serde default is the earlier value (`train.kernels`: `fused`, before `fused_slots` became
/// the default on 2026-12-06), so a config at the new default gets an id of its own, and a grid
/// or a saved `config.yaml` at the old value keeps the ids (and trains the bits) of the runs made
/// before. At the next `RESULTS_VERSION` bump those serde defaults go, like [`ALWAYS_HASHED`].
pub fn unhashed_values() -> Value {
    let unnamed: RunConfig = serde_json::from_value(serde_json::json!({"model": {}, "data": {}, "train": {}}))
        .expect("every field has a default");
    serde_json::to_value(unnamed).expect("serializable")
}

/// What a run id hashes: the resolved config as JSON (in field order), less every field outside
/// [`ALWAYS_HASHED`] that holds its default value (a changed default: the earlier one, see
/// [`unhashed_values`]).
pub fn identity(cfg: &RunConfig) -> Value {
    let mut tree = serde_json::to_value(cfg).expect("serializable");
    let defaults = unhashed_values();
    for (section, fields) in tree.as_object_mut().expect("a struct").iter_mut() {
        let always = ALWAYS_HASHED.iter().find(|(s, _)| s == section).map_or(&[][..], |(_, f)| *f);
        fields
            .as_object_mut()
            .expect("a struct")
            .retain(|key, value| always.contains(&key.as_str()) || defaults[section.as_str()].get(key) != Some(value));
    }
    tree
}

fn resolve(path: &Path, base_tree: &Value, point: &Map<String, Value>) -> Result<RunConfig> {
    let mut tree = base_tree.clone();
    for (k, v) in point {
        set_dotted(&mut tree, k, v.clone()).map_err(|e| err(path, e))?;
    }
    let mut cfg = typed(tree).map_err(|e| err(path, format!("point {}: {e}", Value::Object(point.clone()))))?;
    cfg.model.vocab_size = cfg.data.model_vocab_size();
    cfg.model.group_size.get_or_insert(cfg.train.batch_size);
    cfg.validate().map_err(|e| err(path, format!("point {}: {e}", Value::Object(point.clone()))))?;
    Ok(cfg)
}

fn read_yaml<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| err(path, format!("cannot be read ({e})")))?;
    serde_saphyr::from_str(&text).map_err(|e| err(path, explain_yaml_error(e.to_string())))
}

/// True when a YAML file holds nothing but whitespace, comments and document markers.
fn is_blank_yaml(text: &str) -> bool {
    text.lines().map(str::trim).all(|l| l.is_empty() || l.starts_with('#') || l == "---" || l == "...")
}

/// Reads the grid file, refusing an empty one: it is a mistake, not a request for the defaults.
fn read_grid(path: &Path) -> Result<GridFile> {
    let text = std::fs::read_to_string(path).map_err(|e| err(path, format!("cannot be read ({e})")))?;
    if is_blank_yaml(&text) {
        return Err(err(path, "the grid file is empty (only whitespace or comments): give at least `base:`, `settings:`, `grid:` or `points:` (see experiments/experts.yaml)"));
    }
    let grid: GridFile = serde_saphyr::from_str(&text).map_err(|e| err(path, explain_yaml_error(e.to_string())))?;
    if let Some(slurm) = &grid.slurm {
        slurm.check_values(path)?; // malformed cluster settings fail at plan time, whatever the backend
    }
    Ok(grid)
}

/// Reads and expands a grid file. Nothing is written; every error names the file and the key.
pub fn plan(path: &Path) -> Result<Plan> {
    plan_with_seeds(path, None)
}

/// [`plan`] with the grid's `seeds:` replaced (the CLI's `--seeds 0,1,2`).
/// The sweep's name (it names the results folder): `name:`, else the file stem.
fn grid_name(path: &Path, grid: &GridFile) -> Result<String> {
    let name = grid
        .name
        .clone()
        .unwrap_or_else(|| path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default());
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(err(path, format!("name `{name}` must be letters, digits, - or _ (it names the results folder)")));
    }

    Ok(name)
}

/// Defaults, then the preset, then inline settings, as one config tree.
fn base_tree(path: &Path, grid: &GridFile) -> Result<Value> {
    // Defaults, then the preset, then inline settings: each layer typed-checked against RunConfig.
    let mut tree = serde_json::to_value(RunConfig::default()).expect("serializable");
    if let Some(base) = &grid.base {
        let dir = path.parent().unwrap_or(Path::new("."));
        let candidates = [dir.join("presets").join(format!("{base}.yaml")), dir.join(format!("{base}.yaml"))];
        let preset = candidates.iter().find(|p| p.exists()).ok_or_else(|| {
            err(
                path,
                format!("base `{base}`: no preset {} (presets live in experiments/presets/)", candidates[0].display()),
            )
        })?;
        let _typed: RunConfig = read_yaml(preset)?;
        let settings: Map<String, Value> = read_yaml(preset)?;
        merge(&mut tree, &settings, "").map_err(|e| err(preset, e))?;
    }
    if let Some(settings) = &grid.settings {
        merge(&mut tree, settings, "").map_err(|e| err(path, format!("settings: {e}")))?;
        typed(tree.clone()).map_err(|e| err(path, format!("settings: {e}")))?;
    }

    Ok(tree)
}

/// Refuses, before expanding anything, a grid of more than `max_runs` runs (points × seeds).
fn check_size(path: &Path, grid: &GridFile) -> Result<()> {
    let len = |v: &Value| v.as_array().map_or(1, Vec::len);
    let product = grid.grid.values().fold(1usize, |n, v| n.saturating_mul(len(v)));
    let zip_rows = grid.zip.values().next().map_or(1, len);
    let seeds = grid.seeds.as_ref().map_or(1, |s| s.len().max(1));
    let runs = product.saturating_mul(zip_rows).saturating_add(grid.points.len()).saturating_mul(seeds);
    let limit = grid.max_runs.unwrap_or(MAX_RUNS);
    if runs > limit {
        let shown = if runs == usize::MAX { "more than 10^19".to_string() } else { runs.to_string() };
        return Err(err(path, format!("the grid expands to {shown} runs (points × seeds), more than the limit of {limit}: split it into smaller grids, or raise the limit with `max_runs: N` in the grid file")));
    }
    Ok(())
}

/// The grid points: product of `grid`, times the rows of `zip`, plus `points`, minus `exclude`.
fn expand(path: &Path, grid: &GridFile) -> Result<Vec<Map<String, Value>>> {
    check_size(path, grid)?;
    let mut points: Vec<Map<String, Value>> = vec![Map::new()];
    for (key, values) in &grid.grid {
        let values = list(path, "grid", key, values)?;
        points = points
            .into_iter()
            .flat_map(|p| {
                values.iter().map(move |v| {
                    let mut p = p.clone();
                    p.insert(key.clone(), v.clone());
                    p
                })
            })
            .collect();
    }
    if !grid.zip.is_empty() {
        let lists: Vec<(&String, &Vec<Value>)> =
            grid.zip.iter().map(|(k, v)| list(path, "zip", k, v).map(|l| (k, l))).collect::<Result<_, _>>()?;
        let n = lists[0].1.len();
        if let Some((k, l)) = lists.iter().find(|(_, l)| l.len() != n) {
            return Err(err(
                path,
                format!("zip lists must have equal lengths: `{}` has {n}, `{k}` has {}", lists[0].0, l.len()),
            ));
        }
        points = points
            .into_iter()
            .flat_map(|p| {
                (0..n)
                    .map(|i| {
                        let mut p = p.clone();
                        for (k, l) in &lists {
                            p.insert((*k).clone(), l[i].clone());
                        }
                        p
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
    }
    if grid.grid.is_empty() && grid.zip.is_empty() && !grid.points.is_empty() {
        points.clear();
    }
    points.extend(grid.points.iter().cloned());
    for (i, ex) in grid.exclude.iter().enumerate() {
        check_selector(path, &format!("exclude[{i}]"), ex, &points)?;
    }
    points.retain(|p| !grid.exclude.iter().any(|ex| matches(p, ex)));
    if points.is_empty() {
        return Err(err(path, "the grid is empty (after `exclude`): add values under `grid:`, `zip:` or `points:`"));
    }

    Ok(points)
}

/// `match_baseline`: refuses points whose FLOPs per token differ from the baseline's by more
/// than `tolerance`.
fn check_flops(
    path: &Path,
    points: &[Map<String, Value>],
    configs: &[RunConfig],
    base_flops: f64,
    tolerance: f64,
) -> Result<()> {
    let bad: Vec<String> = points
        .iter()
        .zip(configs)
        .filter(|(_, c)| (c.accounting().flops_per_token / base_flops - 1.0).abs() > tolerance)
        .map(|(p, c)| {
            format!("{} at {:.3}× the baseline", Value::Object(p.clone()), c.accounting().flops_per_token / base_flops)
        })
        .collect();
    if !bad.is_empty() {
        return Err(err(path, format!(
            "flops_per_token: match_baseline refuses {} point(s) whose FLOPs per token differ from the baseline by more than {:.1}%: {}. Fix: make them match, use `flops_per_token: {{solve: model.d_ff}}` to size them, or `flops_per_token: free` for a deliberate mismatch",
            bad.len(), tolerance * 100.0, bad.join("; "))));
    }
    Ok(())
}

/// `{solve: KEY}`: resizes the selected points (default: all but the baseline) until their FLOPs
/// per token match the target point's (default: the baseline's).
fn solve(
    path: &Path,
    tree: &Value,
    points: &mut [Map<String, Value>],
    configs: &mut [RunConfig],
    base_idx: usize,
    tolerance: f64,
    (solve, selected, target): (&String, &Option<Map<String, Value>>, &Option<Map<String, Value>>),
) -> Result<()> {
    let base_flops = configs[base_idx].accounting().flops_per_token;
    if !["model.d_model", "model.d_ff"].contains(&solve.as_str()) {
        return Err(err(
            path,
            format!("flops_per_token.solve = `{solve}`: allowed keys are model.d_model and model.d_ff"),
        ));
    }
    for (what, sel) in [("flops_per_token.points", selected), ("flops_per_token.target", target)] {
        if let Some(sel) = sel {
            check_selector(path, what, sel, points)?;
        }
    }
    let target_flops = match &target {
        None => base_flops,
        Some(sel) => {
            let i = points.iter().position(|p| matches(p, sel)).ok_or_else(|| {
                err(path, format!("flops_per_token.target {} matches no point", Value::Object(sel.clone())))
            })?;
            configs[i].accounting().flops_per_token
        }
    };
    for (i, p) in points.iter_mut().enumerate() {
        let chosen = match &selected {
            Some(sel) => matches(p, sel),
            None => i != base_idx,
        };
        if !chosen {
            continue;
        }
        let (value, flops) = solve_size(&configs[i], solve, target_flops);
        if (flops / target_flops - 1.0).abs() > tolerance {
            return Err(err(path, format!("flops_per_token.solve: no {solve} brings point {} within {:.1}% of the target FLOPs (best {value}: {:.3}×)", Value::Object(p.clone()), tolerance * 100.0, flops / target_flops)));
        }
        p.insert(solve.clone(), Value::from(value));
        configs[i] = resolve(path, tree, p)?;
    }
    Ok(())
}

/// One run per point and seed, each resolved, accounted and named; refuses duplicate configs.
fn seeded_runs(
    path: &Path,
    tree: &Value,
    points: &[Map<String, Value>],
    seeds: &[u64],
    base_idx: usize,
    base_flops: f64,
) -> Result<Vec<PlannedRun>> {
    let mut runs = Vec::new();
    for (i, p) in points.iter().enumerate() {
        for &seed in seeds {
            let mut point = p.clone();
            point.insert("train.seed".into(), Value::from(seed));
            let config = resolve(path, tree, &point)?;
            let accounting = config.accounting();
            runs.push(PlannedRun {
                run_id: run_id(&config),
                // The first point the selector matches is the baseline (a wider dense model
                // matched by the same selector is not).
                is_baseline: i == base_idx,
                flops_ratio: accounting.flops_per_token / base_flops,
                memory: memory_bytes(&config),
                point,
                accounting,
                config,
            });
        }
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = runs.iter().find(|r| !seen.insert(r.run_id.clone())) {
        return Err(err(
            path,
            format!(
                "two points resolve to the same config (run {}, point {}): remove the duplicate",
                dup.run_id,
                Value::Object(dup.point.clone())
            ),
        ));
    }

    Ok(runs)
}

pub fn plan_with_seeds(path: &Path, seeds: Option<&[u64]>) -> Result<Plan> {
    let mut grid = read_grid(path)?;
    if let Some(seeds) = seeds {
        grid.seeds = Some(seeds.to_vec());
    }
    let name = grid_name(path, &grid)?;
    let tree = base_tree(path, &grid)?;
    let mut points = expand(path, &grid)?;
    let seeds = grid.seeds.clone().unwrap_or_else(|| vec![0]);
    if seeds.is_empty() {
        return Err(err(path, "seeds: give at least one seed, e.g. `seeds: [0]`"));
    }
    let baseline = grid.baseline.clone().unwrap_or_default();
    let tolerance = grid.tolerance.unwrap_or(0.01);
    if !(tolerance.is_finite() && tolerance >= 0.0) {
        return Err(err(path, format!("tolerance = {tolerance}: use a finite fraction ≥ 0, e.g. 0.01 (1%)")));
    }

    // Resolve each point once (seed aside) to check and solve FLOPs.
    let mut configs: Vec<RunConfig> = points.iter().map(|p| resolve(path, &tree, p)).collect::<Result<_, _>>()?;
    check_selector(path, "baseline", &baseline, &points)?;
    let base_idx = points.iter().position(|p| matches(p, &baseline)).expect("checked");
    let base_flops = configs[base_idx].accounting().flops_per_token;
    match grid.flops_per_token.clone().unwrap_or(FlopsRule::Mode(FlopsMode::MatchBaseline)) {
        FlopsRule::Mode(FlopsMode::Free) => {}
        FlopsRule::Mode(FlopsMode::MatchBaseline) => check_flops(path, &points, &configs, base_flops, tolerance)?,
        FlopsRule::Solve { solve: key, points: selected, target } => {
            solve(path, &tree, &mut points, &mut configs, base_idx, tolerance, (&key, &selected, &target))?
        }
    }
    check_claims(path, &grid.claims, &points)?;
    let runs = seeded_runs(path, &tree, &points, &seeds, base_idx, base_flops)?;
    Ok(Plan { name, path: path.to_path_buf(), runs, slurm: grid.slurm.clone() })
}

/// The value of `key` (d_model or d_ff, in steps of 1) whose FLOPs per token is closest to `target`.
/// FLOPs grow with either size, so a bisection over 1..=4× the current size finds it in a few
/// dozen evaluations, whatever the size.
fn solve_size(cfg: &RunConfig, key: &str, target: f64) -> (usize, f64) {
    let current = if key == "model.d_model" { cfg.model.d_model } else { cfg.model.d_ff };
    let flops = |v: usize| {
        let mut c = cfg.clone();
        if key == "model.d_model" {
            c.model.d_model = v
        } else {
            c.model.d_ff = v
        }
        c.accounting().flops_per_token
    };
    // The smallest value in [lo, hi] whose FLOPs reach the target (hi if none does).
    let (mut lo, mut hi) = (1usize, current.max(1).saturating_mul(4));
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if flops(mid) >= target {
            hi = mid
        } else {
            lo = mid + 1
        }
    }
    [lo.saturating_sub(1).max(1), lo]
        .into_iter()
        .map(|v| (v, flops(v)))
        .min_by(|a, b| (a.1 - target).abs().total_cmp(&(b.1 - target).abs()))
        .expect("two candidates")
}

impl Plan {
    /// The plan as rows: run id, varied keys, params, FLOPs and ratio to the baseline.
    pub fn table(&self, csv: bool) -> String {
        let keys: Vec<String> = {
            let mut k: Vec<String> = Vec::new();
            for r in &self.runs {
                for key in r.point.keys() {
                    if !k.contains(key) {
                        k.push(key.clone());
                    }
                }
            }
            k
        };
        let mut header = vec!["run_id".to_string()];
        header.extend(keys.iter().cloned());
        header.extend(
            ["baseline", "params_total", "params_active", "flops_per_token", "router_flops_per_token", "flops_ratio"]
                .map(String::from),
        );
        header.push(if csv { "mem_bytes" } else { "mem" }.into());
        let mut rows = vec![header];
        for r in &self.runs {
            let mut row = vec![r.run_id.clone()];
            row.extend(
                keys.iter()
                    .map(|k| r.point.get(k).map(|v| v.to_string().trim_matches('"').to_string()).unwrap_or_default()),
            );
            row.push(if r.is_baseline { "yes".into() } else { String::new() });
            row.push(r.accounting.params_total.to_string());
            row.push(r.accounting.params_active.to_string());
            row.push(format!("{:.0}", r.accounting.flops_per_token));
            row.push(format!("{:.0}", r.accounting.router_flops_per_token));
            row.push(format!("{:.4}", r.flops_ratio));
            row.push(if csv { format!("{:.0}", r.memory) } else { human_bytes(r.memory) });
            rows.push(row);
        }
        if csv {
            return rows.iter().map(|r| r.join(",")).collect::<Vec<_>>().join("\n") + "\n";
        }
        let widths: Vec<usize> =
            (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
        rows.iter()
            .map(|r| r.iter().zip(&widths).map(|(cell, w)| format!("{cell:>w$}")).collect::<Vec<_>>().join("  "))
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    }
}

/// What a switchlab process holds besides its runs' models: the binary, the corpus text while
/// it is split, the token ids (measured: 92 MiB for the embedded corpus with BPE tokens; byte
/// tokens add ~50 MiB).
pub const PROCESS_BYTES: f64 = 160.0 * 1024.0 * 1024.0;

/// Estimated peak memory of one run trained alone, in bytes: [`PROCESS_BYTES`] plus 4 bytes
/// per float of the larger of a training step, 6·P + 1.25·A(batch) (weights, tape gradients,
/// AdamW's m and v, and 2·P of slack; the activations the tape keeps: backward frees each op's
/// inputs as it makes their gradients, so about A at once, with a quarter for slack), and an evaluation, 5·P + A(eval batch). A is
/// [`switch_model::ModelConfig::activation_floats`]. f64 throughout: 10⁹ experts do not overflow.
pub fn memory_bytes(cfg: &RunConfig) -> f64 {
    let params = cfg.accounting().params_total as f64;
    let (le, ld) = cfg.lengths();
    let acts = |batch, train| cfg.model.activation_floats(batch, le, ld, train);
    let train = 6.0 * params + 1.25 * acts(cfg.train.batch_size, true);
    let eval = 5.0 * params + acts(crate::train::eval_batch_examples(cfg), false);
    PROCESS_BYTES + 4.0 * train.max(eval)
}

/// `1.5 GiB`, `37.2 MiB`: binary units, three significant digits.
pub fn human_bytes(bytes: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"];
    let mut v = bytes;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    match v {
        _ if u == 0 => format!("{v:.0} B"),
        _ if v < 10.0 => format!("{v:.2} {}", units[u]),
        _ if v < 100.0 => format!("{v:.1} {}", units[u]),
        _ => format!("{v:.0} {}", units[u]),
    }
}

/// `8G`, `8GiB`, `8GB`, `512M`, `1.5T`, `4096K` (K to E) or plain bytes; units are binary (G = 2³⁰).
pub fn parse_size(text: &str) -> Option<f64> {
    let t = text.trim();
    let t = t.strip_suffix(['B', 'b']).unwrap_or(t);
    let t = t.strip_suffix(['i', 'I']).unwrap_or(t);
    let (digits, scale) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let power = "KMGTPE".find(c.to_ascii_uppercase())? as i32 + 1;
            (&t[..i], 1024f64.powi(power))
        }
        _ => (t, 1.0),
    };
    let v: f64 = digits.trim().parse().ok()?;
    (v.is_finite() && v > 0.0).then_some(v * scale)
}

/// A memory budget and where it comes from (named in refusals).
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryLimit {
    pub bytes: f64,
    pub source: String,
}

impl MemoryLimit {
    /// The least of what this process may still use: the machine's MemAvailable, what is left
    /// under its address-space limit (`ulimit -v`) and under its cgroup's `memory.max` (a
    /// container's or Slurm job's `--mem`). `None` (no limit) when none can be read.
    pub fn available() -> Option<Self> {
        [Self::mem_available(), Self::address_space_left(), Self::cgroup_left()]
            .into_iter()
            .flatten()
            .min_by(|a, b| a.bytes.total_cmp(&b.bytes))
    }

    fn mem_available() -> Option<Self> {
        let bytes = switch_model::procfs::mem_available_bytes()? as f64;
        Some(Self { bytes, source: "available (MemAvailable in /proc/meminfo)".into() })
    }

    /// The soft `RLIMIT_AS` less the address space this process already maps (VmSize).
    fn address_space_left() -> Option<Self> {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit only writes the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut r) } != 0 || r.rlim_cur == libc::RLIM_INFINITY {
            return None;
        }
        let mapped = switch_model::procfs::status_bytes(None, "VmSize").unwrap_or(0) as f64;
        let source = format!(
            "left under the address-space limit (ulimit -v {} KiB, of which {} already mapped)",
            r.rlim_cur / 1024,
            human_bytes(mapped)
        );
        Some(Self { bytes: (r.rlim_cur as f64 - mapped).max(0.0), source })
    }

    /// The cgroup's memory limit (v2 `memory.max`, v1 `memory.limit_in_bytes`) less the anonymous
    /// memory it already holds (page cache is reclaimable, so it is not counted as used).
    fn cgroup_left() -> Option<Self> {
        let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let root = Path::new("/sys/fs/cgroup");
        let v2 = cgroup
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(|rel| (root.join(rel.trim_start_matches('/')), "memory.max", "anon "));
        let v1 = cgroup.lines().find_map(|l| l.split_once(":memory:")).map(|(_, rel)| {
            // Inside a container the cgroup's own folder is often mounted as the root.
            let own = root.join("memory").join(rel.trim_start_matches('/'));
            (if own.exists() { own } else { root.join("memory") }, "memory.limit_in_bytes", "total_rss ")
        });
        [v2, v1].into_iter().flatten().find_map(|(dir, limit_file, used_key)| {
            let max: f64 = std::fs::read_to_string(dir.join(limit_file)).ok()?.trim().parse().ok()?;
            if max >= 2f64.powi(60) {
                return None; // v1 writes "no limit" as a huge number
            }
            let stat = std::fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
            let used: f64 =
                stat.lines().find_map(|l| l.strip_prefix(used_key)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0);
            let source = format!("left under the cgroup limit ({}/{limit_file} = {})", dir.display(), human_bytes(max));
            Some(Self { bytes: (max - used).max(0.0), source })
        })
    }

    /// The `--max-memory` flag's value.
    pub fn from_flag(text: &str) -> Result<Self> {
        let bytes = parse_size(text).ok_or_else(|| {
            Error::input(
                "--max-memory",
                format!("`{text}`: use a size such as `8G`, `512M`, `1.5T` (binary units) or bytes"),
            )
        })?;
        Ok(Self { bytes, source: format!("allowed by --max-memory {text}") })
    }
}

impl Plan {
    /// Refuses, naming the run and the figures, when one of `runs` needs more than `limit`, or
    /// when the `jobs` largest of them, trained at once in one process, need more together
    /// (they share one [`PROCESS_BYTES`]). `None`: no limit.
    pub fn check_memory(&self, runs: &[&PlannedRun], jobs: usize, limit: Option<&MemoryLimit>) -> Result<()> {
        let Some(limit) = limit else { return Ok(()) };
        let mut sorted = runs.to_vec();
        sorted.sort_by(|a, b| b.memory.total_cmp(&a.memory));
        let Some(big) = sorted.first() else { return Ok(()) };
        let fix = "fewer experts or a smaller model (model.num_experts, d_model, d_ff, layers), a smaller train.batch_size or train.eval_batch_size, or a larger --max-memory if you know the machine has it (the README's Memory section has the formula)";
        let have = format!("{} {}", human_bytes(limit.bytes), limit.source);
        if big.memory > limit.bytes {
            let (id, label, need) = (&big.run_id, label(&big.point), human_bytes(big.memory));
            let what = "weights, gradients, AdamW moments and activations";
            let msg =
                format!("run {id} ({label}) needs about {need} of memory ({what}), more than the {have}. Fix: {fix}");
            return Err(err(&self.path, msg));
        }
        let together = |k: usize| PROCESS_BYTES + sorted[..k].iter().map(|r| r.memory - PROCESS_BYTES).sum::<f64>();
        let n = jobs.clamp(1, sorted.len());
        if together(n) > limit.bytes {
            let fits = (1..n).rev().find(|&k| together(k) <= limit.bytes).unwrap_or(1);
            let ids = sorted[..n].iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>().join(", ");
            let need = human_bytes(together(n));
            let msg = format!("{n} runs at once (--jobs {n}; the largest: {ids}) need about {need} of memory together, more than the {have}. Fix: --jobs {fits}, or {fix}");
            return Err(err(&self.path, msg));
        }
        Ok(())
    }
}

/// `model.num_experts=8 train.seed=0` style label of a grid point.
pub fn label(point: &serde_json::Map<String, serde_json::Value>) -> String {
    point.iter().map(|(k, v)| format!("{}={}", k.rsplit('.').next().unwrap_or(k), v)).collect::<Vec<_>>().join(" ")
}
