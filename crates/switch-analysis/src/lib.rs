//! `switch-analysis`: turns a sweep's run folders into the paper's tables and figures.
//!
//! It reads only the run-folder contract (`config.yaml`, `metrics.csv`, `routing.csv`,
//! `status.json`), so it works on results copied from another machine, on a sweep still running
//! and on one with failed runs, which are shown as such.
pub mod claims;
mod figures;
pub mod fit;
pub mod paper;
pub mod plots;
pub mod runs;
pub mod stats;
pub mod synthetic;
mod tables;

use runs::Run;
use std::path::{Path, PathBuf};

/// Runs of one grid point over its seeds.
pub struct Group<'a> {
    pub name: String,
    pub runs: Vec<&'a Run>,
}

impl Group<'_> {
    pub fn first(&self) -> &Run {
        self.runs[0]
    }
    /// Runs with at least one evaluation.
    fn evaluated(&self) -> Vec<&Run> {
        self.runs.iter().copied().filter(|r| !r.curve.is_empty()).collect()
    }
    /// The seed-mean curve without its std: `(step, quality)`.
    fn mean_points(&self) -> Vec<(f64, f64)> {
        self.mean_curve().iter().map(|p| (p.0, p.1)).collect()
    }
    /// Seed-mean neg log perplexity by step, with its std.
    pub fn mean_curve(&self) -> Vec<(f64, f64, f64)> {
        stats::mean_curve(&self.evaluated().iter().map(|r| r.nlp_curve()).collect::<Vec<_>>())
    }
    /// The seeds' mean CPU seconds (of each run's own threads) at `step`, interpolated between
    /// evaluations.
    fn mean_cpu_at(&self, step: f64) -> Option<f64> {
        let cpus: Option<Vec<f64>> = self.evaluated().iter().map(|r| r.cpu_at(step)).collect();
        cpus.filter(|w| !w.is_empty()).map(|w| stats::mean_std(&w).0)
    }
    /// CPU seconds `than`'s run takes to `than_step` minus this group's run to `step`, seed by
    /// seed, over the seeds both have evaluated that far.
    fn paired_cpu_savings(&self, step: f64, than: &Group, than_step: f64) -> Vec<f64> {
        let than_cpu = |seed| than.evaluated().iter().find(|r| r.seed == seed).and_then(|r| r.cpu_at(than_step));
        self.evaluated().iter().filter_map(|r| Some(than_cpu(r.seed)? - r.cpu_at(step)?)).collect()
    }
    /// Seed-mean quality against the seeds' mean CPU seconds, with the quality's std.
    pub fn mean_cpu_curve(&self) -> Vec<(f64, f64, f64)> {
        self.mean_curve().into_iter().filter_map(|(step, q, sd)| Some((self.mean_cpu_at(step)?, q, sd))).collect()
    }
    /// Mean ± std over seeds of the test-split quality (done runs only).
    pub fn test_quality(&self) -> Option<(f64, f64)> {
        let v: Vec<f64> = self.runs.iter().filter_map(|r| r.test_quality).collect();
        (!v.is_empty()).then(|| stats::mean_std(&v))
    }
    /// Test quality minus `base`'s, seed by seed, over the seeds both have scored.
    pub fn paired_test_differences(&self, base: &Group) -> Vec<f64> {
        let base_q = |seed| base.runs.iter().find(|r| r.seed == seed).and_then(|r| r.test_quality);
        self.runs.iter().filter_map(|r| Some(r.test_quality? - base_q(r.seed)?)).collect()
    }
    /// Whether the grid point of this group is selected by `selector` (claims' selectors).
    pub fn selected_by(&self, selector: &switch_rundir::claims::Selector) -> bool {
        switch_rundir::claims::selector_matches(&self.first().point, selector)
    }
    pub fn final_quality(&self) -> Option<(f64, f64)> {
        let v: Vec<f64> = self.evaluated().iter().filter_map(|r| r.final_quality()).collect();
        (!v.is_empty()).then(|| stats::mean_std(&v))
    }
    /// Final quality minus `base`'s, seed by seed, over the seeds both have evaluated: with
    /// paired seeds (same data order, same shared init) most of the seed noise cancels.
    pub fn paired_differences(&self, base: &Group) -> Vec<f64> {
        self.paired_differences_at(base, None)
    }
    /// The same at evaluation `step` (`None`: each run's final evaluation), over the seeds
    /// both have evaluated there.
    pub fn paired_differences_at(&self, base: &Group, step: Option<f64>) -> Vec<f64> {
        // (step, quality) of the evaluation compared; final evaluations pair only at the same step
        // (a run stopped early is not compared with a finished one)
        let quality = |r: &Run| match step {
            None => r.curve.last().map(|p| (p.step, p.neg_log_perplexity)),
            Some(s) => r.curve.iter().find(|p| p.step == s).map(|p| (s, p.neg_log_perplexity)),
        };
        let base_q = |seed| base.evaluated().into_iter().find(|r| r.seed == seed).and_then(quality);
        let pair = |r: &&Run| {
            let ((step, q), (base_step, b)) = (quality(r)?, base_q(r.seed)?);
            (step == base_step).then_some(q - b)
        };
        self.evaluated().iter().filter_map(pair).collect()
    }
    pub fn label(&self) -> String {
        let r = self.first();
        let mut s = r.model_name();
        if r.num_experts > 1 {
            s.push_str(&format!(", cf {}", r.capacity_factor));
        }
        if !r.variant_items.is_empty() {
            s.push_str(&format!(" [{}]", r.variant()));
        }
        s
    }
}

/// The dense group a Switch group is compared with: the one sharing the most of its setting
/// (`variant`) and setting nothing it does not, else a dense baseline (settings that only touch
/// routers leave the dense model unchanged). None when the grid has no dense model.
fn dense_for<'a, 'b>(groups: &'b [Group<'a>], g: &Group, baseline: Option<&'b Group<'a>>) -> Option<&'b Group<'a>> {
    let items = &g.first().variant_items;
    groups
        .iter()
        .filter(|d| d.first().num_experts == 1 && d.first().variant_items.iter().all(|i| items.contains(i)))
        .max_by_key(|d| d.first().variant_items.len())
        .or(baseline.filter(|b| b.first().num_experts == 1))
}

/// One setting of a grid: the Switch groups that share everything but the number of experts
/// (top-k and capacity factor included), with the dense model they are compared with. What one
/// line of a scaling figure and one block of the experts table show.
pub struct Setting<'a, 'b> {
    /// e.g. "router_init_scale=10.0", or "preset" when the points set nothing else.
    pub label: String,
    pub dense: Option<&'b Group<'a>>,
    /// Sorted by the number of experts.
    pub switches: Vec<&'b Group<'a>>,
}

impl<'a, 'b> Setting<'a, 'b> {
    /// The dense model, then the Switch models by number of experts.
    pub fn groups(&self) -> Vec<&'b Group<'a>> {
        self.dense.iter().copied().chain(self.switches.iter().copied()).collect()
    }
}

/// The grid's settings, in grid order; the one with the most Switch points comes first (the
/// scaling series the report leads with).
pub fn settings<'a, 'b>(groups: &'b [Group<'a>], baseline: Option<&'b Group<'a>>) -> Vec<Setting<'a, 'b>> {
    let mut out: Vec<Setting> = Vec::new();
    for g in groups.iter().filter(|g| g.first().num_experts > 1) {
        let r = g.first();
        let label = if r.variant_items.is_empty() { "preset".to_string() } else { r.variant() };
        let key = |s: &Setting| s.label == label && s.switches[0].first().top_k == r.top_k;
        match out.iter_mut().find(|s| key(s)) {
            Some(s) => s.switches.push(g),
            None => out.push(Setting { label, dense: dense_for(groups, g, baseline), switches: vec![g] }),
        }
    }
    for s in &mut out {
        s.switches.sort_by_key(|g| g.first().num_experts);
    }
    name_scaling_settings(&mut out);
    // Stable: among equally long settings, grid order.
    out.sort_by_key(|s| std::cmp::Reverse(s.switches.len()));
    out
}

/// Labels each scaling setting (two or more Switch points) by every key on which the scaling
/// settings differ, including the keys it leaves at their default (`key=default`), so that
/// series in one figure read apart ("router_init_scale=default objective=\"span_corruption\""
/// rather than "preset"); a setting that sets nothing is labelled by the keys the scaling
/// settings set.
fn name_scaling_settings(settings: &mut [Setting]) {
    let scaling: Vec<usize> = (0..settings.len()).filter(|&i| settings[i].switches.len() > 1).collect();
    let value = |s: &Setting, key: &str| -> String {
        let r = s.switches[0].first();
        // The point's value, else the resolved config's (a config leaves defaults out).
        match r.point.get(key).filter(|v| !v.is_null()).or_else(|| runs::get(&r.config, key)) {
            Some(v) if !v.is_null() => v.to_string(),
            _ => "default".into(),
        }
    };
    let label = |s: &Setting, keys: &[String]| {
        keys.iter()
            .map(|k| format!("{}={}", k.rsplit('.').next().unwrap_or(k), value(s, k)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut keys: Vec<String> = Vec::new();
    for &i in &scaling {
        for (k, v) in &settings[i].switches[0].first().point {
            if !v.is_null() && k != "train.seed" && k != "model.num_experts" && !keys.contains(k) {
                keys.push(k.clone());
            }
        }
    }
    for s in settings.iter_mut().filter(|s| s.label == "preset" && s.switches.len() == 1 && !keys.is_empty()) {
        s.label = label(s, &keys);
    }
    keys.retain(|k| {
        let mut values: Vec<String> = scaling.iter().map(|&i| value(&settings[i], k)).collect();
        values.sort();
        values.dedup();
        values.len() > 1
    });
    if keys.is_empty() {
        return;
    }
    for &i in &scaling {
        settings[i].label = label(&settings[i], &keys);
    }
}

/// The runs by grid point. A run whose `config.yaml` cannot be read is in no group: its model
/// and point are unknown (they would read as a dense model of width 0), so it is compared with
/// nothing and only the runs table lists it; so is a run superseded by a later one of its point
/// and seed.
pub fn groups(runs: &[Run]) -> Vec<Group<'_>> {
    let mut out: Vec<Group> = Vec::new();
    for r in runs.iter().filter(|r| r.compared()) {
        match out.iter_mut().find(|g| g.name == r.group) {
            Some(g) => g.runs.push(r),
            None => out.push(Group { name: r.group.clone(), runs: vec![r] }),
        }
    }
    out
}

/// Everything the report's tables and figures read.
pub(crate) struct Sweep<'a> {
    pub runs: &'a [Run],
    pub groups: &'a [Group<'a>],
    /// The dense group every gain and speedup is measured against.
    pub baseline: Option<&'a Group<'a>>,
    pub threshold: Option<f64>,
    /// Step of "quality @ N steps": the option, else the baseline's last evaluation.
    pub at_step: Option<f64>,
    pub seeds: usize,
    /// The grid varies more than the number of experts, and has dense models to compare with.
    pub is_study: bool,
}

pub struct ReportOptions {
    /// Quality threshold for "time to threshold"; default: the baseline's final quality.
    pub threshold: Option<f64>,
    /// Step of "quality @ N steps"; default: the baseline's last step.
    pub at_step: Option<f64>,
}

impl ReportOptions {
    /// Refuses values no table can use (a NaN threshold is never crossed, a negative or
    /// fractional step is never evaluated), naming the flag and what it accepts, so that a typo
    /// fails before anything is written rather than as a report of "not reached".
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(t) = self.threshold.filter(|t| !t.is_finite()) {
            anyhow::bail!("--threshold {t}: must be a finite neg log perplexity (e.g. --threshold -2.5)");
        }
        if let Some(n) = self.at_step.filter(|n| !n.is_finite() || *n < 0.0 || n.fract() != 0.0) {
            anyhow::bail!("--at-step {n}: must be a whole number of training steps, 0 or more (e.g. --at-step 1000)");
        }
        Ok(())
    }
}

fn fmt_q((m, s): (f64, f64), seeds: usize) -> String {
    if seeds > 1 {
        format!("{m:.3} ± {s:.3}")
    } else {
        format!("{m:.3}")
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "–".into())
}

impl<'a> Sweep<'a> {
    /// The comparison context: the baseline (the grid's, else the first dense group), the
    /// threshold and step of "to threshold" / "@ N steps" (default: the baseline's final mean).
    fn new(runs: &'a [Run], groups: &'a [Group<'a>], opts: &ReportOptions) -> Self {
        let baseline = groups
            .iter()
            .find(|g| g.first().is_baseline)
            .or_else(|| groups.iter().find(|g| g.first().num_experts == 1));
        let base_curve: Vec<(f64, f64)> = baseline.map(Group::mean_points).unwrap_or_default();
        let threshold = opts.threshold.or_else(|| base_curve.last().map(|p| p.1));
        let at_step = opts.at_step.or_else(|| base_curve.last().map(|p| p.0));
        let seeds = groups.iter().map(|g| g.runs.len()).max().unwrap_or(1);
        let is_study = groups.iter().any(|g| !g.first().variant_items.is_empty())
            && groups.iter().any(|g| g.first().num_experts == 1);
        Sweep { runs, groups, baseline, threshold, at_step, seeds, is_study }
    }
}

/// Writes `report/report.md`, `report/summary.csv` and the figures for the sweep in `sweep_dir`.
/// `report.md` is removed first and written last (whole, by a rename), so a report that fails
/// midway never leaves a `report.md` beside figures it does not describe.
pub fn report(sweep_dir: &Path, opts: &ReportOptions) -> anyhow::Result<PathBuf> {
    opts.validate()?;
    let runs = runs::load(sweep_dir)?;
    anyhow::ensure!(
        !runs.is_empty(),
        "{}: no run folders yet (results/<sweep>/runs/<id>/config.yaml)",
        sweep_dir.display()
    );
    let out = sweep_dir.join("report");
    std::fs::create_dir_all(&out)?;
    remove_if_present(&out.join("report.md"))?;
    let groups = groups(&runs);
    let s = Sweep::new(&runs, &groups, opts);
    let mut md = String::new();
    let name = sweep_dir.file_name().unwrap_or_default().to_string_lossy().to_string();
    tables::header(&mut md, &name, switch_rundir::grid_description(sweep_dir).as_deref(), &s)?;
    claims::claims_table(&mut md, &s, &switch_rundir::claims::grid_claims(sweep_dir))?;
    tables::experts_table(&mut md, &s)?;
    let fit = tables::gain_fit(&s);
    tables::fit_table(&mut md, fit.as_ref())?;
    tables::study_table(&mut md, &s)?;
    tables::gain_over_training(&mut md, &s)?;
    tables::width_ceiling(&mut md, &s)?;
    tables::table1(&mut md, &s)?;
    tables::table3(&mut md, &s)?;
    tables::routing_health(&mut md, &s)?;
    tables::runs_table(&mut md, &s)?;
    let figures = figures::draw_all(&out, &s, fit.as_ref())?;
    tables::figure_index(&mut md, &figures)?;
    std::fs::write(out.join("summary.csv"), tables::summary_csv(&s)?)?;
    write_whole(&out.join("report.md"), &md)?;
    Ok(out.join("report.md"))
}

/// Removes a previous report's file: kept, it would describe runs the failed report could not.
fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            anyhow::bail!("{}: cannot remove the previous report ({e}); check its permissions", path.display())
        }
        _ => Ok(()),
    }
}

/// Writes `path` through a temporary file and a rename: a reader (or a crash) never sees half of it.
fn write_whole(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("md.partial");
    std::fs::write(&tmp, text).map_err(|e| anyhow::anyhow!("{}: cannot be written ({e})", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| anyhow::anyhow!("{}: cannot be written ({e})", path.display()))
}
