//! The report's figures (PNG + SVG), one function each. Every series holds the runs of one
//! setting (or one grid point), with ± one std over seeds as a band along curves and as error
//! bars at points; the paper's own numbers are drawn as hollow triangles.
use crate::fit::GainFit;
use crate::plots::{self, color, Chart, Marker, Series};
use crate::{paper, settings, Group, Setting, Sweep};
use plotters::style::RGBColor;
use std::path::Path;

/// A group's curve: `(x, seed mean, seed std)` points.
type GroupCurve = dyn Fn(&Group) -> Vec<(f64, f64, f64)>;

/// Curves drawn per grid point stay readable up to this many lines; above it, the figures draw
/// the leading setting (the longest scaling series and its dense model) and say so.
const MAX_LINES: usize = 10;

/// The groups the per-point figures draw, and the legend title that says which (`None`: all).
fn drawn_groups<'a, 'b>(s: &'b Sweep<'a>) -> (Vec<&'b Group<'a>>, Option<String>) {
    if s.groups.len() <= MAX_LINES {
        return (s.groups.iter().collect(), None);
    }
    match settings(s.groups, s.baseline).into_iter().next() {
        Some(main) => (
            main.groups(),
            Some(format!("Setting: {} (the leading one of {} grid points)", main.label, s.groups.len())),
        ),
        None => (
            s.groups.iter().take(MAX_LINES).collect(),
            Some(format!("The first {MAX_LINES} of {} grid points", s.groups.len())),
        ),
    }
}

/// A group's name in a legend: the full label, or only the model when the legend title names
/// the setting.
fn legend_name(g: &Group, one_setting: bool) -> String {
    if one_setting {
        g.first().model_name()
    } else {
        g.label()
    }
}

/// One line per group (the baseline in black, thicker), with a ± std band when it has seeds.
fn group_series(groups: &[&Group], one_setting: bool, f: &GroupCurve) -> Vec<Series> {
    groups
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let c = f(g);
            let base = g.first().is_baseline;
            Series {
                band: if g.evaluated().len() > 1 {
                    c.iter().map(|p| (p.0, p.1 - p.2, p.1 + p.2)).collect()
                } else {
                    vec![]
                },
                highlight: base,
                ..Series::line(
                    legend_name(g, one_setting),
                    c.iter().map(|p| (p.0, p.1)).collect(),
                    if base { RGBColor(0, 0, 0) } else { color(i) },
                )
            }
        })
        .collect()
}

/// Validation quality vs step and vs CPU time, each framed from the second evaluation on (the
/// first sits far below the rest) and in full (`<stem>_full`).
pub(crate) fn quality_figures(out: &Path, s: &Sweep) -> anyhow::Result<()> {
    let (groups, which) = drawn_groups(s);
    let figures: [(&str, &str, &str, &GroupCurve); 2] = [
        ("quality_vs_step", "Validation quality vs step", "training step", &|g| g.mean_curve()),
        ("quality_vs_time", "Validation quality vs CPU time", "CPU seconds of the run's own threads", &|g| {
            g.mean_cpu_curve()
        }),
    ];
    for (stem, title, x_label, curve) in figures {
        let paper = if stem == "quality_vs_step" { "Fig. 4 right" } else { "Fig. 5 right" };
        for from_second in [true, false] {
            let curves = group_series(&groups, which.is_some(), curve);
            let title = if from_second {
                format!("{title}, from the 2nd evaluation ({paper})")
            } else {
                format!("{title}, full range ({paper})")
            };
            let chart = Chart {
                title: &title,
                x_label,
                y_label: "validation neg log perplexity (nats)",
                log_x: false,
                legend_title: which.clone(),
                series: if from_second { plots::after_first(curves) } else { curves },
            };
            plots::write(out, &if from_second { stem.to_string() } else { format!("{stem}_full") }, &chart)?;
        }
    }
    Ok(())
}

/// Whether a Switch group computes its dense model's FLOPs per token (the paper's convention).
fn flop_matched(g: &Group, dense: &Group) -> bool {
    (g.first().flops_per_token / dense.first().flops_per_token.max(1.0) - 1.0).abs() <= 0.01
}

/// A setting's name in a legend.
fn setting_name(set: &Setting) -> String {
    let r = set.switches[0].first();
    let kind = if r.top_k > 1 { format!("top-{} MoE", r.top_k) } else { "Switch".into() };
    if set.label == "preset" {
        kind
    } else {
        format!("{kind}, {}", set.label)
    }
}

/// Test quality vs total parameters at equal FLOPs per token, one series per setting of the
/// leading setting's objective (objectives score on different scales), points labelled by the
/// number of experts.
pub(crate) fn params_figure(out: &Path, s: &Sweep) -> anyhow::Result<bool> {
    let Some((objective, series)) = params_series(s) else { return Ok(false) };
    let title = "Test quality vs parameters at equal FLOPs/token (Fig. 1 left, Fig. 4 left)";
    let bars = if s.seeds > 1 { "bars ± 1 std over seeds" } else { "one seed, no bars" };
    let legend_title = Some(format!("Objective: {}; points labelled by experts; {bars}", short(&objective)));
    plots::write(
        out,
        "quality_vs_params",
        &Chart {
            title,
            x_label: "total parameters (log scale)",
            y_label: "test neg log perplexity (nats)",
            log_x: true,
            legend_title,
            series,
        },
    )?;
    Ok(true)
}

/// The series of [`params_figure`]: one per setting of the leading setting's objective, its
/// dense model first; and that objective.
fn params_series(s: &Sweep) -> Option<(String, Vec<Series>)> {
    let all = settings(s.groups, s.baseline);
    let objective = all.first().map(|m| m.switches[0].first().objective.clone())?;
    let mut series = Vec::new();
    for (i, set) in all.iter().filter(|m| m.switches[0].first().objective == objective).enumerate() {
        let Some(dense) = set.dense else { continue };
        let groups: Vec<&Group> =
            std::iter::once(dense).chain(set.switches.iter().copied().filter(|g| flop_matched(g, dense))).collect();
        let pts: Vec<(&Group, (f64, f64))> = groups.iter().filter_map(|g| Some((*g, g.test_quality()?))).collect();
        if pts.len() < 2 {
            continue;
        }
        let x = |g: &Group| g.first().params_total as f64;
        series.push(Series {
            errors: pts.iter().map(|(g, q)| (x(g), q.0 - q.1, q.0 + q.1)).collect(),
            labels: pts.iter().map(|(g, _)| format!(" {}", g.first().num_experts)).collect(),
            line: pts.len() > 2,
            ..Series::line(setting_name(set), pts.iter().map(|(g, q)| (x(g), q.0)).collect(), color(i))
        });
    }
    Some((objective, series))
}

/// "a prefix LM (NOT …)" → "a prefix LM".
fn short(objective: &str) -> &str {
    objective.split(" (").next().unwrap_or(objective)
}

/// Paired test gain over dense vs the number of experts: every FLOP-matched setting, the fitted
/// curve of the leading setting (dashed, band = ± std of the per-seed fits), and the paper's
/// Table 7 gains of Switch-Base over T5-Base.
pub(crate) fn gain_figure(out: &Path, s: &Sweep, fit: Option<&GainFit>) -> anyhow::Result<bool> {
    let all = settings(s.groups, s.baseline);
    let mut series = Vec::new();
    for (i, set) in all.iter().enumerate() {
        let Some(dense) = set.dense else { continue };
        let pts: Vec<(f64, f64, f64)> = set
            .switches
            .iter()
            .filter(|g| flop_matched(g, dense))
            .filter_map(|g| {
                let d = g.paired_test_differences(dense);
                (!d.is_empty()).then(|| {
                    let (m, sd) = crate::stats::mean_std(&d);
                    (g.first().num_experts as f64, m, sd)
                })
            })
            .collect();
        if pts.is_empty() {
            continue;
        }
        let pts: Vec<(f64, f64, f64)> = std::iter::once((1.0, 0.0, 0.0)).chain(pts).collect();
        series.push(Series {
            errors: pts.iter().map(|p| (p.0, p.1 - p.2, p.1 + p.2)).collect(),
            line: pts.len() > 2,
            ..Series::line(setting_name(set), pts.iter().map(|p| (p.0, p.1)).collect(), color(i))
        });
    }
    if series.is_empty() {
        return Ok(false);
    }
    if let Some(f) = fit {
        let curve = f.curve();
        series.push(Series {
            band: curve.iter().map(|p| (p.0, p.1 - p.2, p.1 + p.2)).collect(),
            dashed: true,
            marker: Marker::None,
            ..Series::line(
                format!("fit: gain = b·log₂E + c·(log₂E)², {}", f.setting),
                curve.iter().map(|p| (p.0, p.1)).collect(),
                color(0),
            )
        });
    }
    series.push(Series::points(
        "paper, Table 7: Switch-Base − T5-Base (16–256 experts, 550k steps)",
        paper::TABLE7_GAINS.to_vec(),
        RGBColor(0, 0, 0),
        Marker::Triangle,
    ));
    plots::write(
        out,
        "gain_vs_experts",
        &Chart {
            title: "Test gain over dense vs experts at equal FLOPs/token (Fig. 1 left / Table 7)",
            x_label: "experts (log scale)",
            y_label: "test gain over dense, nats (paired seeds)",
            log_x: true,
            legend_title: Some("Bars and band: ± 1 std over seeds".into()),
            series,
        },
    )?;
    Ok(true)
}

/// The step speedups of one setting's Switch models over its dense model (seed-mean curves), ±
/// the std over seeds of each seed's own speedup (its Switch run against its dense run).
fn speedup_series(set: &Setting, colour: RGBColor) -> Series {
    let dense_group = set.dense.expect("a setting with a dense model");
    let dense = dense_group.mean_points();
    let pts: Vec<(f64, f64)> = set
        .switches
        .iter()
        .filter_map(|g| Some((g.first().num_experts as f64, crate::stats::step_speedup(&dense, &g.mean_points())?)))
        .collect();
    let errors = set
        .switches
        .iter()
        .filter_map(|g| {
            let e = g.first().num_experts as f64;
            let v = pts.iter().find(|p| p.0 == e)?.1;
            let per_seed: Vec<f64> = g
                .runs
                .iter()
                .filter_map(|r| {
                    let d = dense_group.runs.iter().find(|d| d.seed == r.seed)?;
                    crate::stats::step_speedup(&d.nlp_curve(), &r.nlp_curve())
                })
                .collect();
            (per_seed.len() > 1).then(|| {
                let sd = crate::stats::mean_std(&per_seed).1;
                (e, v - sd, v + sd)
            })
        })
        .collect();
    Series {
        labels: pts.iter().map(|p| format!(" {:.2}×", p.1)).collect(),
        errors,
        ..Series::line(setting_name(set), pts, colour)
    }
}

/// Step speedup to dense's final validation quality vs experts, one series per setting, with the
/// paper's 7.5× at 64 experts.
pub(crate) fn speedup_figure(out: &Path, s: &Sweep) -> anyhow::Result<bool> {
    let all = settings(s.groups, s.baseline);
    // One series per setting with a dense model and several Switch sizes, labelled by speedup.
    let mut series: Vec<Series> = all
        .iter()
        .filter(|set| set.switches.len() > 1 && set.dense.is_some())
        .enumerate()
        .map(|(i, set)| speedup_series(set, color(i)))
        .collect();
    if series.is_empty() {
        return Ok(false);
    }
    series.push(Series::points(
        "paper, Fig. 4 right: Switch-Base-64, 7.5×",
        vec![(64.0, 7.5)],
        RGBColor(0, 0, 0),
        Marker::Triangle,
    ));
    plots::write(
        out,
        "speedup_vs_experts",
        &Chart {
            title: "Step speedup to dense's final validation quality (Fig. 4 right)",
            x_label: "experts (log scale)",
            y_label: "dense steps ÷ Switch steps",
            log_x: true,
            legend_title: Some("Seed-mean curves; bars ± 1 std of the per-seed speedups".into()),
            series,
        },
    )?;
    Ok(true)
}

/// Test quality vs capacity factor, one series per (setting without the capacity factor,
/// experts, top-k) that has several capacity factors.
pub(crate) fn capacity_figure(out: &Path, s: &Sweep) -> anyhow::Result<bool> {
    let key = |g: &Group| {
        let r = g.first();
        let items: Vec<&String> = r.variant_items.iter().filter(|i| !i.starts_with("capacity_factor=")).collect();
        (r.num_experts, r.top_k, format!("{items:?}"))
    };
    let mut keys: Vec<(u64, u64, String)> = Vec::new();
    for k in s.groups.iter().filter(|g| g.first().num_experts > 1).map(key) {
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let mut series = Vec::new();
    for k in &keys {
        let mut pts: Vec<(f64, (f64, f64))> = s
            .groups
            .iter()
            .filter(|g| g.first().num_experts > 1 && key(g) == *k)
            .filter_map(|g| Some((g.first().capacity_factor, g.test_quality()?)))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        pts.dedup_by(|a, b| a.0 == b.0);
        if pts.len() < 2 {
            continue;
        }
        let name = s.groups.iter().find(|g| key(g) == *k).map(|g| g.first().model_name()).unwrap_or_default();
        series.push(Series {
            errors: pts.iter().map(|(x, q)| (*x, q.0 - q.1, q.0 + q.1)).collect(),
            ..Series::line(
                format!("{name} {}", k.2.replace(['[', ']', '"'], "")),
                pts.iter().map(|(x, q)| (*x, q.0)).collect(),
                color(series.len()),
            )
        });
    }
    if series.is_empty() {
        return Ok(false);
    }
    plots::write(
        out,
        "capacity_factor",
        &Chart {
            title: "Test quality vs capacity factor (Table 1)",
            x_label: "capacity factor",
            y_label: "test neg log perplexity (nats)",
            log_x: false,
            legend_title: Some("Bars: ± 1 std over seeds".into()),
            series,
        },
    )?;
    Ok(true)
}

/// Lever study: each drawn Switch group's seed-mean validation curve minus its dense curve.
pub(crate) fn gain_vs_step_figure(out: &Path, s: &Sweep) -> anyhow::Result<()> {
    let (groups, which) = drawn_groups(s);
    let gains: Vec<Series> = groups
        .iter()
        .filter(|g| g.first().num_experts > 1)
        .enumerate()
        .filter_map(|(i, g)| {
            let dense = crate::dense_for(s.groups, g, s.baseline)?.mean_curve();
            let pts = g
                .mean_curve()
                .iter()
                .filter_map(|&(step, q, _)| dense.iter().find(|d| d.0 == step).map(|d| (step, q - d.1)))
                .collect();
            Some(Series::line(legend_name(g, which.is_some()), pts, color(i)))
        })
        .collect();
    plots::write(
        out,
        "gain_vs_step",
        &Chart {
            title: "Validation gain over the matching dense model vs step",
            x_label: "training step",
            y_label: "Switch − dense (nats, seed means)",
            log_x: false,
            legend_title: which,
            series: gains,
        },
    )
}

/// Least-loaded expert and dropped fraction over training, one line per drawn grid point
/// (seed means).
pub(crate) fn routing_figures(out: &Path, s: &Sweep) -> anyhow::Result<()> {
    let (groups, which) = drawn_groups(s);
    let sparse: Vec<&&Group> = groups.iter().filter(|g| g.first().num_experts > 1).collect();
    let seed_mean = |g: &Group, f: &dyn Fn(&crate::runs::Run) -> Vec<(f64, f64)>| -> Vec<(f64, f64)> {
        let curves: Vec<Vec<(f64, f64)>> = g.evaluated().into_iter().map(f).collect();
        crate::stats::mean_curve(&curves).into_iter().map(|p| (p.0, p.1)).collect()
    };
    let min_load = |r: &crate::runs::Run| -> Vec<(f64, f64)> {
        let mut steps: Vec<f64> = r.routing.iter().map(|x| x.step).collect();
        steps.dedup();
        let e = r.num_experts as f64;
        let min_at =
            |s: f64| r.routing.iter().filter(|x| x.step == s).map(|x| x.load_fraction * e).fold(f64::MAX, f64::min);
        steps.into_iter().map(|s| (s, min_at(s))).collect()
    };
    let drops =
        |r: &crate::runs::Run| -> Vec<(f64, f64)> { r.curve.iter().map(|p| (p.step, p.drop_fraction)).collect() };
    for (stem, title, y_label, f) in [
        (
            "routing_min_load",
            "Least-loaded expert over training (1 = uniform, 0 = dead)",
            "min expert load × experts",
            &min_load as &dyn Fn(&crate::runs::Run) -> Vec<(f64, f64)>,
        ),
        ("routing_drop_fraction", "Fraction of tokens dropped (training batch)", "dropped fraction", &drops),
    ] {
        let series = sparse
            .iter()
            .enumerate()
            .map(|(i, g)| Series::line(legend_name(g, which.is_some()), seed_mean(g, f), color(i)))
            .collect();
        let chart =
            Chart { title, x_label: "training step", y_label, log_x: false, legend_title: which.clone(), series };
        plots::write(out, stem, &chart)?;
    }
    Ok(())
}

/// Draws every figure that applies to this sweep; returns `(file stem, title)` in report order.
pub(crate) fn draw_all(
    out: &Path,
    s: &Sweep,
    fit: Option<&GainFit>,
) -> anyhow::Result<Vec<(&'static str, &'static str)>> {
    let mut figs = vec![];
    if params_figure(out, s)? {
        figs.push(("quality_vs_params", "Test quality vs parameters at equal FLOPs (Fig. 1 left / Fig. 4 left)"));
    }
    if gain_figure(out, s, fit)? {
        figs.push(("gain_vs_experts", "Test gain over dense vs experts, with the paper's Table 7 gains"));
    }
    if speedup_figure(out, s)? {
        figs.push(("speedup_vs_experts", "Step speedup to dense quality vs experts (Fig. 4 right)"));
    }
    quality_figures(out, s)?;
    figs.extend([
        ("quality_vs_time", "Validation quality vs CPU time (Fig. 5 right; framed from the second evaluation on)"),
        ("quality_vs_step", "Validation quality vs step (framed from the second evaluation on)"),
        ("quality_vs_step_full", "Validation quality vs step, full range"),
        ("quality_vs_time_full", "Validation quality vs CPU time, full range"),
    ]);
    if capacity_figure(out, s)? {
        figs.push(("capacity_factor", "Capacity factor"));
    }
    if s.is_study {
        gain_vs_step_figure(out, s)?;
        figs.push(("gain_vs_step", "Gain over the matching dense model vs step"));
    }
    routing_figures(out, s)?;
    figs.push(("routing_min_load", "Routing: least-loaded expert"));
    figs.push(("routing_drop_fraction", "Routing: dropped tokens"));
    Ok(figs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::SyntheticRun;

    /// Two settings (router_init_scale unset and 10) × dense, 2, 4, 8 experts × 2 seeds, the way
    /// `experiments/paper.yaml` lays them out, the Switch runs ahead of dense by 0.01·E and 0.1·E.
    fn two_settings() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        for seed in 0..2u64 {
            let dense = SyntheticRun::new("x", 1, seed, 300);
            dense.write(tmp.path(), |s| -3.0 + s / 1000.0).unwrap();
            for e in [2u64, 4, 8] {
                for (tag, setting) in [("p", vec![]), ("c", vec![("model.router_init_scale", serde_json::json!(10.0))])]
                {
                    let id = format!("{tag}{e}s{seed}");
                    let bonus = if tag == "c" { 0.1 } else { 0.01 } * e as f64;
                    SyntheticRun { setting, ..SyntheticRun::new(&id, e, seed, 300) }
                        .write(tmp.path(), move |s| -3.0 + s / 1000.0 + bonus)
                        .unwrap();
                }
            }
            std::fs::rename(tmp.path().join("runs/x"), tmp.path().join(format!("runs/d{seed}"))).unwrap();
        }
        tmp
    }

    /// The params figure draws one series per setting, each starting at dense and rising in
    /// parameters (no line through another setting's runs).
    #[test]
    fn the_params_figure_draws_one_series_per_setting() {
        let tmp = two_settings();
        let runs = crate::runs::load(tmp.path()).unwrap();
        let groups = crate::groups(&runs);
        let s = Sweep::new(&runs, &groups, &crate::ReportOptions { threshold: None, at_step: None });
        let (_, series) = params_series(&s).unwrap();
        assert_eq!(series.len(), 2, "{:?}", series.iter().map(|x| &x.name).collect::<Vec<_>>());
        for x in &series {
            assert_eq!(x.labels, [" 1", " 2", " 4", " 8"], "{}", x.name);
            assert!(x.points.windows(2).all(|w| w[1].0 > w[0].0), "{} zigzags: {:?}", x.name, x.points);
            assert_eq!(x.errors.len(), 4);
        }
        let names: Vec<&str> = series.iter().map(|x| x.name.as_str()).collect();
        assert!(
            names.contains(&"Switch, router_init_scale=10.0") && names.contains(&"Switch, router_init_scale=default"),
            "{names:?}"
        );
    }

    /// The speedup figure, too, draws every setting that has a dense model and several Switch
    /// sizes, not only the leading one.
    #[test]
    fn the_speedup_figure_draws_one_series_per_setting() {
        let tmp = two_settings();
        let runs = crate::runs::load(tmp.path()).unwrap();
        let groups = crate::groups(&runs);
        let s = Sweep::new(&runs, &groups, &crate::ReportOptions { threshold: None, at_step: None });
        assert!(speedup_figure(tmp.path(), &s).unwrap());
        let svg = std::fs::read_to_string(tmp.path().join("speedup_vs_experts.svg")).unwrap();
        for name in ["Switch, router_init_scale=10.0", "Switch, router_init_scale=default", "paper, Fig. 4 right"] {
            assert!(svg.contains(name), "{name} is missing from the figure");
        }
    }
}
