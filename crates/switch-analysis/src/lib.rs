//! `switch-analysis`: turns a sweep's run folders into the paper's tables and figures.
//!
//! It reads only the run-folder contract (`config.yaml`, `metrics.csv`, `routing.csv`,
//! `status.json`), so it works on results copied from another machine, on a sweep still running
//! and on one with failed runs, which are shown as such.
pub mod paper;
pub mod plots;
pub mod runs;
pub mod stats;

use plots::{color, Chart, Series};
use plotters::style::RGBColor;
use runs::Run;
use std::fmt::Write as _;
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
    /// The seeds' mean wall-clock seconds at `step`, interpolated between evaluations.
    fn mean_wall_at(&self, step: f64) -> Option<f64> {
        let walls: Option<Vec<f64>> = self
            .evaluated()
            .iter()
            .map(|r| stats::interpolate(&r.curve.iter().map(|p| (p.step, p.wall_s)).collect::<Vec<_>>(), step))
            .collect();
        walls.filter(|w| !w.is_empty()).map(|w| stats::mean_std(&w).0)
    }
    pub fn final_quality(&self) -> Option<(f64, f64)> {
        let v: Vec<f64> = self.evaluated().iter().filter_map(|r| r.final_quality()).collect();
        (!v.is_empty()).then(|| stats::mean_std(&v))
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

pub fn groups(runs: &[Run]) -> Vec<Group<'_>> {
    let mut out: Vec<Group> = Vec::new();
    for r in runs {
        match out.iter_mut().find(|g| g.name == r.group) {
            Some(g) => g.runs.push(r),
            None => out.push(Group { name: r.group.clone(), runs: vec![r] }),
        }
    }
    out
}

pub struct ReportOptions {
    /// Quality threshold for "time to threshold"; default: the baseline's final quality.
    pub threshold: Option<f64>,
    /// Step of "quality @ N steps"; default: the baseline's last step.
    pub at_step: Option<f64>,
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

/// Our row's counterpart in the paper's Table 1, by kind and capacity factor.
fn table1_match(g: &Group) -> Option<paper::Table1Row> {
    let r = g.first();
    let widened = r.variant_items.iter().any(|i| i.contains("d_model="));
    paper::table1_row_for(r.num_experts, r.top_k, r.capacity_factor, widened)
}

/// The Table 1 analog: quality after N steps, steps and seconds to the threshold on each group's
/// seed-mean curve (interpolated between evaluations), speed; then the paper's rows, each once,
/// with the rows of ours that correspond to it.
fn table1(md: &mut String, groups: &[Group], threshold: Option<f64>, at_step: f64) -> anyhow::Result<()> {
    writeln!(md, "## Switch vs MoE vs dense (paper: Table 1)\n")?;
    writeln!(md, "| Model | Capacity factor | Quality @ {at_step:.0} steps | Steps to threshold | Time to threshold (s) | Speed (examples/s) | Paper row |")?;
    writeln!(md, "|---|---|---|---|---|---|---|")?;
    for g in groups {
        let r = g.first();
        let qs: Vec<f64> = g.evaluated().iter().filter_map(|r| stats::value_at(&r.nlp_curve(), at_step)).collect();
        let steps_to = threshold.and_then(|t| stats::first_crossing(&g.mean_points(), t));
        let time_to = steps_to.and_then(|s| g.mean_wall_at(s));
        let speed: Vec<f64> = g.runs.iter().filter_map(|r| r.examples_per_s()).collect();
        let reached =
            |v: Option<f64>, digits| v.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "not reached".into());
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.model_name(),
            if r.num_experts > 1 { format!("{}", r.capacity_factor) } else { "–".into() },
            if qs.is_empty() { "–".into() } else { fmt_q(stats::mean_std(&qs), qs.len()) },
            reached(steps_to, 0),
            reached(time_to, 1),
            opt((!speed.is_empty()).then(|| stats::mean_std(&speed).0), 1),
            table1_match(g).map_or("–", |p| p.model),
        )?;
    }
    writeln!(md, "\nSteps and time to threshold are read off the seed-mean curve, interpolated between evaluations (time: the seeds' mean wall-clock at that step).\n")?;
    writeln!(md, "The paper's Table 1 (128 experts, T5-Base FLOPs per token, 100k steps on 32 TPUv3 cores):\n")?;
    writeln!(md, "| Paper model | Capacity factor | Quality @100k | Hours to −1.50 | Examples/s | Ours |\n|---|---|---|---|---|---|")?;
    for p in paper::TABLE1 {
        let ours: Vec<String> = groups.iter().filter(|g| table1_match(g) == Some(*p)).map(Group::label).collect();
        let ours = if ours.is_empty() { "not in this grid".into() } else { ours.join("; ") };
        let cf = p.capacity_factor.map_or("–".into(), |c| format!("{c:?}"));
        writeln!(md, "| {} | {cf} | {} | {} | {} | {ours} |", p.model, p.quality, p.hours, p.speed)?;
    }
    writeln!(md)?;
    Ok(())
}

/// Writes `report/report.md`, `report/summary.csv` and the figures for the sweep in `sweep_dir`.
pub fn report(sweep_dir: &Path, opts: &ReportOptions) -> anyhow::Result<PathBuf> {
    let runs = runs::load(sweep_dir)?;
    anyhow::ensure!(
        !runs.is_empty(),
        "{}: no run folders yet (results/<sweep>/runs/<id>/config.yaml)",
        sweep_dir.display()
    );
    let out = sweep_dir.join("report");
    std::fs::create_dir_all(&out)?;
    let name = sweep_dir.file_name().unwrap_or_default().to_string_lossy().to_string();
    let groups = groups(&runs);
    let baseline =
        groups.iter().find(|g| g.first().is_baseline).or_else(|| groups.iter().find(|g| g.first().num_experts == 1));
    let base_curve: Vec<(f64, f64)> = baseline.map(Group::mean_points).unwrap_or_default();
    let threshold = opts.threshold.or_else(|| base_curve.last().map(|p| p.1));
    let at_step = opts.at_step.or_else(|| base_curve.last().map(|p| p.0)).unwrap_or(f64::MAX);
    let seeds = groups.iter().map(|g| g.runs.len()).max().unwrap_or(1);

    let mut md = String::new();
    let first = &runs[0];
    writeln!(md, "# Sweep `{name}`\n")?;
    writeln!(md, "Held-out neg log perplexity (nats per target token, higher is better) of T5-style span corruption on the embedded English corpus. {} run(s), {} grid point(s), {} seed(s) per point.\n", runs.len(), groups.len(), seeds)?;
    writeln!(md, "**Scaled down from the paper:** {} active parameters per token instead of 223M (T5-Base), {} training steps of {} examples instead of 100k–550k steps of 2²⁰ tokens, a {} vocabulary instead of 32k SentencePiece, {} instead of C4. Compare trends, not absolute values.\n",
        plots::format_si(first.params_active as f64), first.steps_total, first.batch_size, first.vocabulary, first.corpus)?;
    if let Some(t) = threshold {
        writeln!(md, "Threshold for \"steps/time to threshold\": {t:.3} (the dense baseline's final quality). Quality @ N uses N = {at_step:.0}.\n")?;
    }

    // Experts scaling (Fig. 4, Table 7).
    writeln!(md, "## Scaling with the number of experts (paper: Fig. 4, Table 7)\n")?;
    writeln!(md, "| Model | Experts | Params | Active params | Quality | Gain over dense | Step speedup to dense quality | Paper params | Paper quality | Paper gain |")?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|")?;
    for g in groups.iter().filter(|g| g.first().top_k == 1) {
        let r = g.first();
        let q = g.final_quality();
        let curve = g.mean_points();
        let speedup = if r.num_experts > 1 {
            let dense_curve = dense_for(&groups, g, baseline).map(Group::mean_points).unwrap_or_default();
            stats::step_speedup(&dense_curve, &curve)
                .map(|s| format!("{s:.2}×"))
                .unwrap_or_else(|| "not reached".into())
        } else {
            "1.00×".into()
        };
        let paper = paper::experts_row(r.num_experts);
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            g.label(),
            r.num_experts,
            plots::format_si(r.params_total as f64),
            plots::format_si(r.params_active as f64),
            q.map(|q| fmt_q(q, g.runs.len())).unwrap_or_else(|| format!(
                "{} ({})",
                r.state,
                r.problem.clone().unwrap_or_default()
            )),
            match (q, dense_for(&groups, g, baseline).and_then(|d| d.final_quality())) {
                (Some(q), Some(b)) if r.num_experts > 1 => format!("{:+.3}", q.0 - b.0),
                _ => "–".into(),
            },
            speedup,
            paper.0,
            paper.1,
            paper.2
        )?;
    }
    writeln!(md, "\nPaper: Switch-Base with 64 experts reaches T5-Base's step-450k quality at step 60k, a 7.5× step speedup; 2, 4 and 8 experts also improve over T5-Base (Fig. 12, no numbers given).\n")?;

    // A lever study (each Switch setting against the dense model of the same setting): the grid varies more than the number of experts, and has dense models to compare with.
    let is_study =
        groups.iter().any(|g| !g.first().variant_items.is_empty()) && groups.iter().any(|g| g.first().num_experts == 1);
    if is_study {
        writeln!(md, "## Gain over dense, setting by setting\n")?;
        writeln!(md, "Each Switch point against the dense model with the same setting (or the baseline, for settings that only touch routers). **Separation** is the gain ÷ twice the larger seed std: above 1 the gain is outside the seed noise.\n")?;
        writeln!(md, "| Setting | Model | Seeds | Dense | Switch | Gain | Separation | FLOPs ÷ dense |\n|---|---|---|---|---|---|---|---|")?;
        for g in groups.iter().filter(|g| g.first().num_experts > 1) {
            let Some(d) = dense_for(&groups, g, baseline) else { continue };
            let (Some(qd), Some(qs)) = (d.final_quality(), g.final_quality()) else { continue };
            let n = g.evaluated().len().min(d.evaluated().len());
            let noise = 2.0 * qd.1.max(qs.1);
            let unfinished = g.runs.iter().chain(&d.runs).any(|r| r.state != "done");
            writeln!(
                md,
                "| {}{} | {} | {n} | {} | {} | {:+.3} | {} | {:.3} |",
                if g.first().variant_items.is_empty() { "preset".into() } else { g.first().variant() },
                if unfinished { " (unfinished: last evaluation)" } else { "" },
                g.first().model_name(),
                fmt_q(qd, d.evaluated().len()),
                fmt_q(qs, g.evaluated().len()),
                qs.0 - qd.0,
                if n > 1 && noise > 0.0 { format!("{:.2}", (qs.0 - qd.0) / noise) } else { "–".into() },
                g.first().flops_per_token / d.first().flops_per_token.max(1.0),
            )?;
        }
        writeln!(md)?;
    }

    table1(&mut md, &groups, threshold, at_step)?;

    // Table 3 analog, when init scales differ.
    let scales: Vec<f64> = {
        let mut s: Vec<f64> = runs.iter().map(|r| r.init_scale).collect();
        s.sort_by(f64::total_cmp);
        s.dedup();
        s
    };
    if scales.len() > 1 {
        writeln!(md, "## Initialisation scale (paper: Table 3)\n")?;
        writeln!(
            md,
            "| Init scale | Runs | Mean quality | Std over seeds | Paper mean | Paper std |\n|---|---|---|---|---|---|"
        )?;
        for s in &scales {
            let v: Vec<f64> = runs
                .iter()
                .filter(|r| r.init_scale == *s && r.num_experts > 1)
                .filter_map(|r| r.final_quality())
                .collect();
            let failed = runs.iter().filter(|r| r.init_scale == *s && r.state == "failed").count();
            let (m, sd) = if v.is_empty() { (f64::NAN, f64::NAN) } else { stats::mean_std(&v) };
            let p = paper::table3_row(*s);
            writeln!(
                md,
                "| {s} | {}{} | {m:.3} | {sd:.3} | {} | {} |",
                v.len(),
                if failed > 0 { format!(" ({failed} failed)") } else { String::new() },
                p.0,
                p.1
            )?;
        }
        writeln!(md)?;
    }

    // Routing health.
    writeln!(md, "## Routing health\n")?;
    writeln!(md, "Per sparse layer at the last evaluation: expert load relative to uniform (1.00 = perfectly balanced), fraction of tokens dropped at the evaluation capacity factor, and the router's mean entropy ÷ ln(experts) (1.00 = a uniform router, whose top-1 gate is 1/experts and so scales the expert output down by that much).\n")?;
    writeln!(
        md,
        "| Run | Model | Layer | Min load | Max load | Dead experts | Dropped | Router entropy ÷ ln E |\n|---|---|---|---|---|---|---|---|"
    )?;
    let mut dead_total = 0;
    for r in runs.iter().filter(|r| r.num_experts > 1) {
        let Some(last) = r.routing.iter().map(|x| x.step).reduce(f64::max) else { continue };
        let mut layers: Vec<&str> = r.routing.iter().filter(|x| x.step == last).map(|x| x.layer.as_str()).collect();
        layers.dedup();
        for layer in layers {
            let rows: Vec<_> = r.routing.iter().filter(|x| x.step == last && x.layer == layer).collect();
            let e = rows.len() as f64;
            let (lo, hi) = rows
                .iter()
                .fold((f64::MAX, 0f64), |(a, b), x| (a.min(x.load_fraction * e), b.max(x.load_fraction * e)));
            let dead = rows.iter().filter(|x| x.load_fraction == 0.0).count();
            dead_total += dead;
            writeln!(
                md,
                "| {} | {} | {layer} | {lo:.2} | {hi:.2} | {dead} | {:.1}% | {:.2} |",
                r.id,
                r.model_name(),
                rows[0].drop_fraction * 100.0,
                rows[0].router_entropy / e.ln()
            )?;
        }
    }
    writeln!(
        md,
        "\n{}\n",
        if dead_total == 0 {
            "No expert has zero load at the end of training in any run.".to_string()
        } else {
            format!("**{dead_total} expert(s) have zero load at the end of training** (see the table).")
        }
    )?;

    // Runs.
    writeln!(md, "## Runs\n\n| Run | Point | Seed | State | Steps | Final quality | Tokens/s | Note |\n|---|---|---|---|---|---|---|---|")?;
    for r in &runs {
        writeln!(
            md,
            "| {} | {} | {} | {} | {:.0}/{} | {} | {} | {} |",
            r.id,
            r.group,
            r.seed,
            r.state,
            r.final_step,
            r.steps_total,
            opt(r.final_quality(), 3),
            opt(r.tokens_per_s(), 0),
            r.error.clone().or_else(|| r.problem.clone()).unwrap_or_default().replace('|', "/").replace('\n', " ")
        )?;
    }

    // Figures.
    let series = |f: &dyn Fn(&Group) -> Vec<(f64, f64, f64)>| -> Vec<Series> {
        groups
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let c = f(g);
                let base = g.first().is_baseline;
                Series {
                    name: g.label(),
                    points: c.iter().map(|p| (p.0, p.1)).collect(),
                    band: if g.evaluated().len() > 1 {
                        c.iter().map(|p| (p.0, p.1 - p.2, p.1 + p.2)).collect()
                    } else {
                        vec![]
                    },
                    color: if base { RGBColor(0, 0, 0) } else { color(i) },
                    highlight: base,
                }
            })
            .collect()
    };
    for (stem, from_second) in [("quality_vs_step", true), ("quality_vs_step_full", false)] {
        let curves = series(&|g| g.mean_curve());
        let chart = Chart {
            title: if from_second {
                "Held-out quality vs training step, from the second evaluation (Fig. 4 right)"
            } else {
                "Held-out quality vs training step (Fig. 4 right)"
            },
            x_label: "training step",
            y_label: "neg log perplexity (nats)",
            log_x: false,
            legend_upper: false,
            series: if from_second { plots::after_first(curves) } else { curves },
        };
        plots::write(&out, stem, &chart)?;
    }
    let wall = |g: &Group| -> Vec<(f64, f64, f64)> {
        g.evaluated().first().map(|r| r.wall_curve().iter().map(|p| (p.0, p.1, 0.0)).collect()).unwrap_or_default()
    };
    plots::write(
        &out,
        "quality_vs_time",
        &Chart {
            title: "Held-out quality vs wall-clock time (Fig. 5)",
            x_label: "seconds",
            y_label: "neg log perplexity (nats)",
            log_x: false,
            legend_upper: false,
            series: series(&wall),
        },
    )?;
    let by_params: Vec<(f64, f64, f64)> = groups
        .iter()
        .filter(|g| g.first().top_k == 1)
        .filter_map(|g| g.final_quality().map(|q| (g.first().params_total as f64, q.0, q.1)))
        .collect();
    plots::write(
        &out,
        "quality_vs_params",
        &Chart {
            title: "Final quality vs parameters at equal FLOPs/token (Fig. 4 left)",
            x_label: "total parameters (log scale)",
            y_label: "neg log perplexity (nats)",
            log_x: true,
            legend_upper: false,
            series: vec![Series {
                name: "Switch (dense at the left)".into(),
                points: by_params.iter().map(|p| (p.0, p.1)).collect(),
                band: if seeds > 1 {
                    by_params.clone().iter().map(|p| (p.0, p.1 - p.2, p.1 + p.2)).collect()
                } else {
                    vec![]
                },
                color: color(0),
                highlight: false,
            }],
        },
    )?;
    let mut cap_series = Vec::new();
    for (i, k) in [1u64, 2].iter().enumerate() {
        let mut pts: Vec<(f64, f64)> = groups
            .iter()
            .filter(|g| g.first().num_experts > 1 && g.first().top_k == *k)
            .filter_map(|g| g.final_quality().map(|q| (g.first().capacity_factor, q.0)))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        if pts.windows(2).any(|w| w[0].0 != w[1].0) {
            cap_series.push(Series::line(if *k == 1 { "Switch (top-1)" } else { "MoE (top-2)" }, pts, color(i)));
        }
    }
    let has_capacity_plot = !cap_series.is_empty();
    if has_capacity_plot {
        plots::write(
            &out,
            "capacity_factor",
            &Chart {
                title: "Final quality vs capacity factor (Table 1)",
                x_label: "capacity factor",
                y_label: "neg log perplexity (nats)",
                log_x: false,
                legend_upper: false,
                series: cap_series,
            },
        )?;
    }
    // Lever study: each Switch setting's seed-mean curve minus its dense curve, step by step.
    if is_study {
        let gains: Vec<Series> = groups
            .iter()
            .filter(|g| g.first().num_experts > 1)
            .enumerate()
            .filter_map(|(i, g)| {
                let dense = dense_for(&groups, g, baseline)?.mean_curve();
                let pts = g
                    .mean_curve()
                    .iter()
                    .filter_map(|&(step, q, _)| dense.iter().find(|d| d.0 == step).map(|d| (step, q - d.1)))
                    .collect();
                Some(Series::line(g.label(), pts, color(i)))
            })
            .collect();
        plots::write(
            &out,
            "gain_vs_step",
            &Chart {
                title: "Gain over the matching dense model vs training step (seed means)",
                x_label: "training step",
                y_label: "Switch − dense (nats)",
                log_x: false,
                legend_upper: true,
                series: gains,
            },
        )?;
    }
    let balance: Vec<Series> = runs
        .iter()
        .filter(|r| r.num_experts > 1)
        .enumerate()
        .map(|(i, r)| {
            let mut steps: Vec<f64> = r.routing.iter().map(|x| x.step).collect();
            steps.dedup();
            let pts = steps
                .iter()
                .map(|&s| {
                    (
                        s,
                        r.routing
                            .iter()
                            .filter(|x| x.step == s)
                            .map(|x| x.load_fraction * r.num_experts as f64)
                            .fold(f64::MAX, f64::min),
                    )
                })
                .collect();
            Series::line(format!("{} {}", r.model_name(), r.id), pts, color(i))
        })
        .collect();
    plots::write(
        &out,
        "routing_min_load",
        &Chart {
            title: "Least-loaded expert over training (1 = uniform, 0 = dead)",
            x_label: "training step",
            y_label: "min expert load × experts",
            log_x: false,
            legend_upper: true,
            series: balance,
        },
    )?;
    let drops: Vec<Series> = runs
        .iter()
        .filter(|r| r.num_experts > 1)
        .enumerate()
        .map(|(i, r)| {
            Series::line(
                format!("{} {}", r.model_name(), r.id),
                r.curve.iter().map(|p| (p.step, p.drop_fraction)).collect(),
                color(i),
            )
        })
        .collect();
    plots::write(
        &out,
        "routing_drop_fraction",
        &Chart {
            title: "Fraction of tokens dropped (training batch)",
            x_label: "training step",
            y_label: "dropped fraction",
            log_x: false,
            legend_upper: true,
            series: drops,
        },
    )?;

    writeln!(md, "\n## Figures\n")?;
    let mut figs = vec![
        ("quality_vs_step", "Quality vs step (framed from the second evaluation on)"),
        ("quality_vs_step_full", "Quality vs step, full range"),
        ("quality_vs_params", "Quality vs parameters"),
        ("quality_vs_time", "Quality vs wall-clock time"),
    ];
    if has_capacity_plot {
        figs.push(("capacity_factor", "Capacity factor"));
    }
    if is_study {
        figs.push(("gain_vs_step", "Gain over the matching dense model vs step"));
    }
    figs.extend([
        ("routing_min_load", "Routing: least-loaded expert"),
        ("routing_drop_fraction", "Routing: dropped tokens"),
    ]);
    for (stem, title) in figs {
        writeln!(md, "### {title}\n\n![{title}]({stem}.png)\n")?;
    }
    std::fs::write(out.join("report.md"), md)?;

    let mut csv = String::from("run_id,group,seed,state,is_baseline,num_experts,top_k,capacity_factor,init_scale,params_total,params_active,flops_per_token,final_step,final_neg_log_perplexity,steps_to_threshold,wall_s,tokens_per_s,examples_per_s\n");
    for r in &runs {
        writeln!(
            csv,
            "{},\"{}\",{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            r.id,
            r.group,
            r.seed,
            r.state,
            r.is_baseline,
            r.num_experts,
            r.top_k,
            r.capacity_factor,
            r.init_scale,
            r.params_total,
            r.params_active,
            r.flops_per_token,
            r.final_step,
            opt(r.final_quality(), 6),
            threshold
                .and_then(|t| stats::first_crossing(&r.nlp_curve(), t))
                .map(|v| format!("{v:.1}"))
                .unwrap_or_default(),
            r.final_wall_s,
            opt(r.tokens_per_s(), 1),
            opt(r.examples_per_s(), 2)
        )?;
    }
    std::fs::write(out.join("summary.csv"), csv)?;
    Ok(out.join("report.md"))
}
