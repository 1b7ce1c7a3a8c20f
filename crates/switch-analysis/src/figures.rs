//! The report's figures (PNG + SVG), one function each.
use crate::plots::{self, color, Chart, Series};
use crate::{dense_for, Group, Sweep};
use plotters::style::RGBColor;
use std::path::Path;

/// A group's curve: `(x, seed mean, seed std)` points.
type GroupCurve = dyn Fn(&Group) -> Vec<(f64, f64, f64)>;

/// One line per group (the baseline in black), with a ± std band when it has several seeds.
fn group_series(groups: &[Group], f: &GroupCurve) -> Vec<Series> {
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
}

/// Quality vs step and vs wall-clock time, each framed from the second evaluation on (the first
/// sits far below the rest) and in full (`<stem>_full`).
pub(crate) fn quality_figures(out: &Path, s: &Sweep) -> anyhow::Result<()> {
    let Sweep { groups, .. } = *s;
    let wall = |g: &Group| -> Vec<(f64, f64, f64)> {
        g.evaluated().first().map(|r| r.wall_curve().iter().map(|p| (p.0, p.1, 0.0)).collect()).unwrap_or_default()
    };
    let figures: [(&str, &str, &str, &GroupCurve); 2] = [
        ("quality_vs_step", "Held-out quality vs training step", "training step", &|g| g.mean_curve()),
        ("quality_vs_time", "Held-out quality vs wall-clock time", "seconds", &wall),
    ];
    for (stem, title, x_label, curve) in figures {
        let paper = if stem == "quality_vs_step" { "Fig. 4 right" } else { "Fig. 5" };
        for from_second in [true, false] {
            let curves = group_series(groups, curve);
            let chart = Chart {
                title: &if from_second {
                    format!("{title}, from the second evaluation ({paper})")
                } else {
                    format!("{title} ({paper})")
                },
                x_label,
                y_label: "neg log perplexity (nats)",
                log_x: false,
                legend_upper: false,
                series: if from_second { plots::after_first(curves) } else { curves },
            };
            plots::write(out, &if from_second { stem.to_string() } else { format!("{stem}_full") }, &chart)?;
        }
    }
    Ok(())
}

/// Final quality vs parameters at equal FLOPs per token.
pub(crate) fn params_figure(out: &Path, s: &Sweep) -> anyhow::Result<()> {
    let Sweep { groups, seeds, .. } = *s;
    let by_params: Vec<(f64, f64, f64)> = groups
        .iter()
        .filter(|g| g.first().top_k == 1)
        .filter_map(|g| g.final_quality().map(|q| (g.first().params_total as f64, q.0, q.1)))
        .collect();
    plots::write(
        out,
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
    Ok(())
}

/// Final quality vs capacity factor, when capacity factors differ; whether it was drawn.
pub(crate) fn capacity_figure(out: &Path, s: &Sweep) -> anyhow::Result<bool> {
    let Sweep { groups, .. } = *s;
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
            out,
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
    Ok(has_capacity_plot)
}

/// Lever study: each Switch setting's seed-mean curve minus its dense curve, step by step.
pub(crate) fn gain_figure(out: &Path, s: &Sweep) -> anyhow::Result<()> {
    let Sweep { groups, baseline, is_study, .. } = *s;
    if is_study {
        let gains: Vec<Series> = groups
            .iter()
            .filter(|g| g.first().num_experts > 1)
            .enumerate()
            .filter_map(|(i, g)| {
                let dense = dense_for(groups, g, baseline)?.mean_curve();
                let pts = g
                    .mean_curve()
                    .iter()
                    .filter_map(|&(step, q, _)| dense.iter().find(|d| d.0 == step).map(|d| (step, q - d.1)))
                    .collect();
                Some(Series::line(g.label(), pts, color(i)))
            })
            .collect();
        plots::write(
            out,
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
    Ok(())
}

/// Least-loaded expert and dropped fraction over training, per run.
pub(crate) fn routing_figures(out: &Path, s: &Sweep) -> anyhow::Result<()> {
    let Sweep { runs, .. } = *s;
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
        out,
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
        out,
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
    Ok(())
}

/// Draws every figure that applies to this sweep; returns `(file stem, title)` in report order.
pub(crate) fn draw_all(out: &Path, s: &Sweep) -> anyhow::Result<Vec<(&'static str, &'static str)>> {
    quality_figures(out, s)?;
    params_figure(out, s)?;
    let has_capacity_plot = capacity_figure(out, s)?;
    gain_figure(out, s)?;
    routing_figures(out, s)?;
    let mut figs = vec![
        ("quality_vs_step", "Quality vs step (framed from the second evaluation on)"),
        ("quality_vs_step_full", "Quality vs step, full range"),
        ("quality_vs_params", "Quality vs parameters"),
        ("quality_vs_time", "Quality vs wall-clock time (framed from the second evaluation on)"),
        ("quality_vs_time_full", "Quality vs wall-clock time, full range"),
    ];
    if has_capacity_plot {
        figs.push(("capacity_factor", "Capacity factor"));
    }
    if s.is_study {
        figs.push(("gain_vs_step", "Gain over the matching dense model vs step"));
    }
    figs.push(("routing_min_load", "Routing: least-loaded expert"));
    figs.push(("routing_drop_fraction", "Routing: dropped tokens"));
    Ok(figs)
}
