//! The report's Markdown tables, one function each, laid out like the paper's.
use crate::fit::GainFit;
use crate::{dense_for, fmt_q, opt, paper, plots, settings, stats, Group, Setting, Sweep};
use std::fmt::Write as _;
use switch_rundir::State;

/// The title, the grid's description, what was measured and on which split, how it is scaled
/// down from the paper, and the threshold.
pub(crate) fn header(md: &mut String, name: &str, description: Option<&str>, s: &Sweep) -> anyhow::Result<()> {
    let Sweep { runs, groups, threshold, at_step, seeds, .. } = *s;
    // What a run trained on is known only from a readable config; superseded runs are not described.
    let readable: Vec<&crate::runs::Run> = runs.iter().filter(|r| r.compared()).collect();
    let first = readable.first().copied().unwrap_or(&runs[0]);
    writeln!(md, "# Sweep `{name}`\n")?;
    if let Some(d) = description {
        writeln!(md, "> {}\n", d.replace('\n', "\n> "))?;
    }
    let mut objectives: Vec<&str> = readable.iter().map(|r| r.objective.as_str()).collect();
    objectives.sort_unstable();
    objectives.dedup();
    if objectives.is_empty() {
        objectives.push("an unknown objective (no readable config.yaml)");
    }
    let superseded = runs.iter().filter(|r| r.superseded_by.is_some()).count();
    let extra = if superseded > 0 { format!(" (and {superseded} superseded)") } else { String::new() };
    writeln!(md, "Neg log perplexity (nats per target token, higher is better) of {} on the embedded English corpus. {} run(s){extra}, {} grid point(s), {} seed(s) per point.\n", objectives.join(" and "), runs.len() - superseded, groups.len(), seeds)?;
    let current: Vec<&crate::runs::Run> = runs.iter().filter(|r| r.superseded_by.is_none()).collect();
    let tested = current.iter().filter(|r| r.test_quality.is_some()).count();
    if tested > 0 {
        writeln!(md, "**Splits:** training text, a **validation** split (every evaluation during training: curves, steps and time to threshold, any choice of settings) and a **test** split scored once per run after its last step (final qualities, gains, claims); the three are disjoint. {tested} of {} runs have a test score.\n", current.len())?;
    } else {
        writeln!(md, "**Splits:** these runs predate the test split (RESULTS_VERSION < 7): every number is on the one held-out split, which also chose the settings.\n")?;
    }
    writeln!(md, "**Scaled down from the paper:** {} active parameters per token instead of 223M (T5-Base), {} training steps of {} examples instead of 100k–550k steps of 2²⁰ tokens, a {} vocabulary instead of 32k SentencePiece, {} instead of C4. Compare trends, not absolute values.\n",
        plots::format_si(first.params_active as f64), first.steps_total, first.batch_size, first.vocabulary, first.corpus)?;
    writeln!(
        md,
        "**Engine:** {} (`train.kernels`; the modes differ in floating-point order and speed, not in the model).\n",
        kernels_in_words(&readable)
    )?;
    if let (Some(t), Some(n)) = (threshold, at_step) {
        writeln!(md, "Threshold for \"steps/time to threshold\": {t:.3} (the dense baseline's final validation quality). Quality @ N uses N = {n:.0}.\n")?;
    }
    let superseded: Vec<String> =
        runs.iter().filter_map(|r| Some(format!("{} (by {})", r.id, r.superseded_by.as_ref()?))).collect();
    if !superseded.is_empty() {
        writeln!(
            md,
            "**Superseded** (the same point and seed as a run that started later, e.g. one trained before a changed default or results version; listed in the runs table, left out of every comparison): {}.\n",
            superseded.join(", ")
        )?;
    }
    let diverged: Vec<String> =
        current.iter().filter_map(|r| Some(format!("{} (step {:.0})", r.id, r.diverged_at?))).collect();
    if !diverged.is_empty() {
        writeln!(
            md,
            "**Diverged** (NaN or infinite validation loss; curves stop at the last finite evaluation): {}.\n",
            diverged.join(", ")
        )?;
    }
    Ok(())
}

/// Which CPU kernels trained the runs: "the `fused_slots` kernels in every run", or each mode
/// with its count of runs.
fn kernels_in_words(runs: &[&crate::runs::Run]) -> String {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for r in runs {
        let k = r.kernels.as_deref().map_or("not recorded".to_string(), |k| format!("`{k}`"));
        match counts.iter_mut().find(|(seen, _)| *seen == k) {
            Some((_, n)) => *n += 1,
            None => counts.push((k, 1)),
        }
    }
    match counts.as_slice() {
        [] => "kernels unknown (no readable config.yaml)".into(),
        [(k, _)] => format!("kernels {k} in every run"),
        _ => {
            let each: Vec<String> = counts.iter().map(|(k, n)| format!("{k} in {n} run(s)")).collect();
            format!("kernels {}", each.join(", "))
        }
    }
}

/// The figures section: each drawn figure's PNG under its title.
pub(crate) fn figure_index(md: &mut String, figures: &[(&str, &str)]) -> anyhow::Result<()> {
    writeln!(md, "\n## Figures\n")?;
    for (stem, title) in figures {
        writeln!(md, "### {title}\n\n![{title}]({stem}.png)\n")?;
    }
    Ok(())
}

/// A group's quality cell: `mean ± std`, or the run's state and problem.
fn quality_cell(g: &Group, q: Option<(f64, f64)>) -> String {
    let r = g.first();
    q.map(|q| fmt_q(q, g.runs.len())).unwrap_or_else(|| match &r.problem {
        Some(p) => format!("{} ({p})", r.state_label()),
        None => r.state_label(),
    })
}

/// Quality against the number of experts, setting by setting, beside the paper's Fig. 4 /
/// Table 7: validation and test quality, the paired test gain over the setting's dense model,
/// the step speedup to its final validation quality, and both FLOPs counts.
pub(crate) fn experts_table(md: &mut String, s: &Sweep) -> anyhow::Result<()> {
    let all = settings(s.groups, s.baseline);
    if all.is_empty() {
        return Ok(());
    }
    writeln!(md, "## Scaling with the number of experts (paper: Fig. 1 left, Fig. 4, Table 7)\n")?;
    writeln!(md, "Setting by setting: each Switch model against the dense model of its setting. **Paired gain** is the mean ± std over seeds of the per-seed test difference (paired seeds share data order and shared weights), **sep** its mean ÷ std. **Step speedup**: dense steps to its own final validation quality ÷ the model's (seed-mean curves). **FLOPs ÷ dense** by the paper's convention (expert FFN = one dense FFN, router aside) and as computed (router and every capacity slot).\n")?;
    let (scaling, single): (Vec<&Setting>, Vec<&Setting>) = all.iter().partition(|set| set.switches.len() > 1);
    for set in &scaling {
        writeln!(md, "### {}\n", if set.label == "preset" { "Preset".to_string() } else { set.label.clone() })?;
        experts_rows(md, &set.groups().iter().map(|g| (*g, set.dense)).collect::<Vec<_>>())?;
    }
    if !single.is_empty() {
        writeln!(
            md,
            "### {}\n",
            if scaling.is_empty() { "Switch points" } else { "Other points, each against its setting's dense model" }
        )?;
        let mut rows: Vec<(&Group, Option<&Group>)> = Vec::new();
        for d in single.iter().filter_map(|set| set.dense) {
            if !rows.iter().any(|(g, _)| std::ptr::eq(*g, d)) {
                rows.push((d, Some(d)));
            }
        }
        rows.extend(single.iter().flat_map(|set| set.switches.iter().map(|g| (*g, set.dense))));
        experts_rows(md, &rows)?;
    }
    writeln!(md, "Paper: Switch-Base with 64 experts reaches T5-Base's step-450k quality at step 60k, a 7.5× step speedup; 2, 4 and 8 experts also improve over T5-Base (Fig. 12, no numbers given).\n")?;
    Ok(())
}

/// The experts table's rows: each group against its dense model (`None`: no dense to compare).
fn experts_rows(md: &mut String, rows: &[(&Group, Option<&Group>)]) -> anyhow::Result<()> {
    writeln!(md, "| Model | Experts | Params | FLOPs ÷ dense (paper / computed) | Validation | Test | Paired test gain | sep | Step speedup | Paper params | Paper quality | Paper gain |")?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|")?;
    for &(g, dense) in rows {
        let r = g.first();
        let is_dense = r.num_experts == 1;
        let (gain, sep) = match dense {
            Some(d) if !is_dense => paired_test(&g.paired_test_differences(d)),
            _ => ("–".into(), "–".into()),
        };
        let dense_curve = dense.map(Group::mean_points).unwrap_or_default();
        let speedup = if is_dense {
            "1.00×".into()
        } else {
            stats::step_speedup(&dense_curve, &g.mean_points()).map_or("not reached".into(), |x| format!("{x:.2}×"))
        };
        let flops = match dense {
            Some(d) => format!(
                "{:.2} / {:.2}",
                r.flops_per_token / d.first().flops_per_token.max(1.0),
                r.flops_per_token_computed / d.first().flops_per_token_computed.max(1.0)
            ),
            None => "–".into(),
        };
        let paper = paper::experts_row(r.num_experts);
        writeln!(
            md,
            "| {} | {} | {} | {flops} | {} | {} | {gain} | {sep} | {speedup} | {} | {} | {} |",
            g.label(),
            r.num_experts,
            plots::format_si(r.params_total as f64),
            quality_cell(g, g.final_quality()),
            quality_cell(g, g.test_quality()),
            paper.0,
            paper.1,
            paper.2
        )?;
    }
    writeln!(md)?;
    Ok(())
}

/// `mean ± std` of per-seed test differences and mean ÷ std.
fn paired_test(diffs: &[f64]) -> (String, String) {
    match diffs.len() {
        0 => ("–".into(), "–".into()),
        1 => (format!("{:+.3}", diffs[0]), "–".into()),
        _ => {
            let (m, sd) = stats::mean_std(diffs);
            (format!("{m:+.3} ± {sd:.3}"), if sd > 1e-9 { format!("{:.1}", m / sd) } else { "exact".into() })
        }
    }
}

/// The leading setting's per-seed gains fitted against log₂ E ([`crate::fit`]), when it has
/// at least three Switch sizes and two seeds.
pub(crate) fn gain_fit(s: &Sweep) -> Option<GainFit> {
    let main = settings(s.groups, s.baseline).into_iter().next()?;
    let dense = main.dense?;
    let gains: Vec<(u64, f64, f64)> = main
        .switches
        .iter()
        .filter(|g| (g.first().flops_per_token / dense.first().flops_per_token.max(1.0) - 1.0).abs() <= 0.01)
        .flat_map(|g| {
            g.runs.iter().filter_map(move |r| {
                let base = dense.runs.iter().find(|d| d.seed == r.seed)?.test_quality?;
                Some((r.seed, g.first().num_experts as f64, r.test_quality? - base))
            })
        })
        .collect();
    GainFit::new(main.label.clone(), &gains)
}

/// The fit of gain against log₂ E, and where returns diminish.
pub(crate) fn fit_table(md: &mut String, fit: Option<&GainFit>) -> anyhow::Result<()> {
    let Some(f) = fit else { return Ok(()) };
    let ((b, bs), (c, cs)) = (f.b(), f.c());
    writeln!(md, "## The scaling curve, fitted ({})\n", f.setting)?;
    writeln!(md, "Each seed's paired test gains over dense fitted by least squares to gain = b·log₂E + c·(log₂E)² (no intercept: dense gains nothing over itself); mean ± std over {} seeds: **b = {b:+.4} ± {bs:.4}**, **c = {c:+.4} ± {cs:.4}** nats. Returns diminish (c < 0 by more than 2 std): **{}**.\n", f.per_seed.len(), if f.returns_diminish() { "yes" } else { "no" })?;
    writeln!(md, "| Doubling | Fitted gain of the doubling (nats) |\n|---|---|")?;
    let top = f.max_experts.log2().round() as u32;
    for x in 1..=top {
        let (m, sd) = f.doubling_gain(x as f64);
        writeln!(md, "| {} → {} experts | {m:+.4} ± {sd:.4} |", 1u64 << (x - 1), 1u64 << x)?;
    }
    writeln!(md)?;
    Ok(())
}

/// Our row's counterpart in the paper's Table 1, by kind and capacity factor. Switch+ is a
/// Switch point that sets `model.d_model` wider than its dense comparison (experiments/capacity.yaml).
fn table1_match(s: &Sweep, g: &Group) -> Option<paper::Table1Row> {
    let r = g.first();
    let dense_width = dense_for(s.groups, g, s.baseline).map_or(0, |d| d.first().d_model);
    let sets_width = r.variant_items.iter().any(|i| i.starts_with("d_model="));
    let widened = r.num_experts > 1 && sets_width && r.d_model > dense_width;
    paper::table1_row_for(r.num_experts, r.top_k, r.capacity_factor, widened)
}

/// The Table 1 analog: test quality, validation quality after N steps, steps and CPU time to
/// the threshold on each group's seed-mean validation curve (interpolated between
/// evaluations), examples per CPU second; then the paper's rows, each once, with ours beside.
pub(crate) fn table1(md: &mut String, s: &Sweep) -> anyhow::Result<()> {
    let Sweep { groups, threshold, at_step, .. } = *s;
    let at = at_step.map_or("last".into(), |n| format!("{n:.0}"));
    writeln!(md, "## Switch vs MoE vs dense (paper: Table 1)\n")?;
    writeln!(md, "Time is the CPU time of each run's own threads (user + system), so another process on the machine does not inflate it; examples/s are per CPU second.\n")?;
    writeln!(md, "| Model | Setting | Capacity factor | FLOPs ÷ baseline (paper / computed) | Test quality | Validation @ {at} steps | Steps to threshold | CPU s to threshold | Examples per CPU s | Paper row |")?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|")?;
    let base = s.baseline.map(|b| b.first());
    for g in groups {
        let r = g.first();
        let qs: Vec<f64> = match at_step {
            Some(n) => g.evaluated().iter().filter_map(|r| stats::value_at(&r.nlp_curve(), n)).collect(),
            None => g.evaluated().iter().filter_map(|r| r.final_quality()).collect(),
        };
        let steps_to = threshold.and_then(|t| stats::first_crossing(&g.mean_points(), t));
        let time_to = steps_to.and_then(|s| g.mean_cpu_at(s));
        let speed: Vec<f64> = g.runs.iter().filter_map(|r| r.examples_per_s()).collect();
        let reached =
            |v: Option<f64>, digits| v.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "not reached".into());
        let flops = base.map_or("–".into(), |b| {
            format!(
                "{:.2} / {:.2}",
                r.flops_per_token / b.flops_per_token.max(1.0),
                r.flops_per_token_computed / b.flops_per_token_computed.max(1.0)
            )
        });
        writeln!(
            md,
            "| {} | {} | {} | {flops} | {} | {} | {} | {} | {} | {} |",
            r.model_name(),
            if r.variant_items.is_empty() { "preset".into() } else { r.variant() },
            if r.num_experts > 1 { format!("{}", r.capacity_factor) } else { "–".into() },
            g.test_quality().map_or("–".into(), |q| fmt_q(q, g.runs.len())),
            if qs.is_empty() { "–".into() } else { fmt_q(stats::mean_std(&qs), qs.len()) },
            reached(steps_to, 0),
            reached(time_to, 1),
            opt((!speed.is_empty()).then(|| stats::mean_std(&speed).0), 1),
            table1_match(s, g).map_or("–", |p| p.model),
        )?;
    }
    writeln!(md, "\nSteps and CPU time to threshold are read off the seed-mean validation curve, interpolated between evaluations (CPU time: the seeds' mean at that step).\n")?;
    writeln!(md, "The paper's Table 1 (128 experts, T5-Base FLOPs per token, 100k steps on 32 TPUv3 cores):\n")?;
    writeln!(md, "| Paper model | Capacity factor | Quality @100k | Hours to −1.50 | Examples/s | Ours |\n|---|---|---|---|---|---|")?;
    for p in paper::TABLE1 {
        let ours: Vec<String> = groups.iter().filter(|g| table1_match(s, g) == Some(*p)).map(Group::label).collect();
        let ours = if ours.is_empty() { "not in this grid".into() } else { ours.join("; ") };
        let cf = p.capacity_factor.map_or("–".into(), |c| format!("{c:?}"));
        writeln!(md, "| {} | {cf} | {} | {} | {} | {ours} |", p.model, p.quality, p.hours, p.speed)?;
    }
    writeln!(md)?;
    Ok(())
}

/// `mean ± std` of per-seed differences and their separation, mean ÷ (2 · std): above 1 the
/// gain is outside the paired seed noise ("exact" when every seed gives the same difference).
fn paired(diffs: &[f64]) -> (String, String) {
    if diffs.len() < 2 {
        return ("–".into(), "–".into());
    }
    let (m, sd) = stats::mean_std(diffs);
    // Below 1e-9 the spread is the logs' rounding, not seed noise.
    let sep = if sd > 1e-9 { format!("{:.2}", m / (2.0 * sd)) } else { "exact".into() };
    (format!("{m:+.3} ± {sd:.3}"), sep)
}

/// A lever study: each Switch setting against the dense model of the same setting.
pub(crate) fn study_table(md: &mut String, s: &Sweep) -> anyhow::Result<()> {
    let Sweep { groups, baseline, is_study, .. } = *s;
    if is_study {
        writeln!(
            md,
            "## Gain over dense, setting by setting
"
        )?;
        writeln!(md, "On the **validation** split (final evaluation; the test split's paired gains are in the scaling table above). Each Switch point against the dense model with the same setting (or the baseline, for settings that only touch routers). **Separation** is the gain ÷ twice the larger seed std: above 1 the gain is outside the seed noise. **Paired gain** is the mean ± std of the per-seed differences (both arms of a seed see the same batches and start from the same shared weights), and its separation the mean ÷ twice that std.\n")?;
        writeln!(md, "| Setting | Model | Seeds | Dense | Switch | Gain | Separation | Paired gain | Paired separation | FLOPs ÷ dense |\n|---|---|---|---|---|---|---|---|---|---|")?;
        for g in groups.iter().filter(|g| g.first().num_experts > 1) {
            let Some(d) = dense_for(groups, g, baseline) else { continue };
            let (Some(qd), Some(qs)) = (d.final_quality(), g.final_quality()) else { continue };
            let n = g.evaluated().len().min(d.evaluated().len());
            let noise = 2.0 * qd.1.max(qs.1);
            let unfinished = g.runs.iter().chain(&d.runs).any(|r| !r.finished());
            let (paired_gain, paired_sep) = paired(&g.paired_differences(d));
            writeln!(
                md,
                "| {}{} | {} | {n} | {} | {} | {:+.3} | {} | {paired_gain} | {paired_sep} | {:.3} |",
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
    Ok(())
}

/// The width ceiling: in each setting, a dense model with E× the feed-forward width (not
/// FLOP-matched) bounds roughly what Switch-E at the base width can gain; the table gives that
/// ceiling and the share of it Switch-E recovers, seed by seed.
/// The paired gain at evaluations along the way. Both learning-rate schedules are independent
/// of the run's length (warmup, then 1/√step), so step s of a long run is a run of s steps: one
/// long run per arm shows whether the gap grows or shrinks with training tokens.
pub(crate) fn gain_over_training(md: &mut String, s: &Sweep) -> anyhow::Result<()> {
    let pairs: Vec<(&Group, &Group)> = s
        .groups
        .iter()
        .filter(|g| g.first().num_experts > 1)
        .filter_map(|g| Some((g, dense_for(s.groups, g, s.baseline)?)))
        .filter(|(g, d)| g.first().steps_total == d.first().steps_total)
        .collect();
    let Some((_, dense)) = pairs.first() else { return Ok(()) };
    let evals: Vec<f64> = dense.mean_points().iter().map(|p| p.0).collect();
    if evals.len() < 6 {
        return Ok(());
    }
    let mut steps: Vec<f64> = (1..=6).map(|i| evals[(evals.len() * i).div_ceil(6) - 1]).collect();
    steps.dedup();
    writeln!(
        md,
        "## Gain as training goes
"
    )?;
    writeln!(md, "Each Switch point minus the dense model of its setting at evaluations along the way, mean ± std of per-seed differences (paired seeds). The learning-rate schedule does not depend on the run's length, so the column at step s is what runs of s steps would show.\n")?;
    let head: String = steps.iter().map(|s| format!(" step {s:.0} |")).collect();
    writeln!(md, "| Model | Seeds |{head}\n|---|---|{}", "---|".repeat(steps.len()))?;
    for (g, d) in pairs {
        let cells: String = steps
            .iter()
            .map(|&step| {
                let diffs = g.paired_differences_at(d, Some(step));
                match diffs.len() {
                    0 => " – |".to_string(),
                    1 => format!(" {:+.3} |", diffs[0]),
                    _ => format!(" {} |", paired(&diffs).0),
                }
            })
            .collect();
        writeln!(md, "| {} | {} |{cells}", g.label(), g.paired_differences(d).len())?;
    }
    writeln!(md)?;
    Ok(())
}

pub(crate) fn width_ceiling(md: &mut String, s: &Sweep) -> anyhow::Result<()> {
    // Width 0: a config without `model.d_ff`, whose width is unknown; no ceiling is measured from it.
    let dense: Vec<&Group> = s.groups.iter().filter(|g| g.first().num_experts == 1 && g.first().d_ff > 0).collect();
    // A Switch model's setting items that no dense model sets (e.g. `router_init_scale=10.0`)
    // touch only its routers: it is measured against the ceiling of the dense models without them.
    let dense_items: Vec<&str> = dense.iter().flat_map(|d| d.first().setting_without_width()).collect();
    let ceiling_setting = |g: &Group| -> Vec<String> {
        g.first().setting_without_width().into_iter().filter(|i| dense_items.contains(i)).map(String::from).collect()
    };
    let mut rows = Vec::new();
    for base in &dense {
        let (setting, width) = (ceiling_setting(base), base.first().d_ff);
        let same_setting = |g: &Group| ceiling_setting(g) == setting;
        if dense.iter().any(|d| same_setting(d) && d.first().d_ff < width) {
            continue; // the ceiling is measured from the narrowest dense model of a setting
        }
        let wider = |w: &&&Group| same_setting(w) && w.first().d_ff > width && w.first().d_ff.is_multiple_of(width);
        for wide in dense.iter().filter(wider) {
            let e = wide.first().d_ff / width;
            let switches: Vec<&Group> = s
                .groups
                .iter()
                .filter(|g| {
                    let r = g.first();
                    r.num_experts == e && r.top_k == 1 && r.d_ff == width && same_setting(g)
                })
                .collect();
            if switches.is_empty() {
                rows.push(ceiling_row(base, wide, None, e));
            }
            rows.extend(switches.into_iter().map(|sw| ceiling_row(base, wide, Some(sw), e)));
        }
    }
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(
        md,
        "## How much of the width ceiling do experts recover
"
    )?;
    writeln!(md, "In each setting (what the points set besides experts and width), **Dense E×** is the dense model with E× the feed-forward width: same depth, E× the feed-forward FLOPs, **not FLOP-matched — it is the ceiling**, about the most Switch-E at the base width can gain. **Ceiling** = Dense E× − dense and **Switch gain** = Switch-E − dense, as mean ± std of per-seed differences; **Recovered** = Switch gain ÷ ceiling, seed by seed. A Switch model whose setting also touches only its routers (\"Switch with …\") is measured against the ceiling of the dense models without it.\n")?;
    writeln!(md, "| Setting | E | Seeds | Dense | Ceiling (Dense E× − dense) | FLOPs ÷ dense | Switch-E gain | Recovered |\n|---|---|---|---|---|---|---|---|")?;
    for row in rows {
        writeln!(md, "{row}")?;
    }
    writeln!(md)?;
    Ok(())
}

fn ceiling_row(base: &Group, wide: &Group, switch: Option<&Group>, e: u64) -> String {
    let base_items = base.first().setting_without_width();
    let mut setting = base_items.join(" ");
    if setting.is_empty() {
        setting = "preset".into();
    }
    let router_only: Vec<&str> = switch
        .map(|g| g.first().setting_without_width().into_iter().filter(|i| !base_items.contains(i)).collect())
        .unwrap_or_default();
    if !router_only.is_empty() {
        setting.push_str(&format!(", Switch with {}", router_only.join(" ")));
    }
    let all = base.runs.iter().chain(&wide.runs).chain(switch.into_iter().flat_map(|g| &g.runs));
    if all.into_iter().any(|r| !r.finished()) {
        setting.push_str(" (unfinished: last evaluation)");
    }
    let ceiling = wide.paired_differences(base);
    let gains = switch.map(|g| g.paired_differences(base)).unwrap_or_default();
    let recovered: Vec<f64> = switch
        .map(|g| {
            g.evaluated()
                .iter()
                .filter_map(|r| {
                    let of = |grp: &Group| grp.evaluated().into_iter().find(|x| x.seed == r.seed)?.final_quality();
                    let (d, w, q) = (of(base)?, of(wide)?, r.final_quality()?);
                    Some((q - d) / (w - d))
                })
                .collect()
        })
        .unwrap_or_default();
    let pm = |v: &[f64], digits: usize| match v.len() {
        0 => "–".to_string(),
        1 => format!("{:+.digits$}", v[0]),
        _ => {
            let (m, sd) = stats::mean_std(v);
            format!("{m:+.digits$} ± {sd:.digits$}")
        }
    };
    format!(
        "| {} | {e} | {} | {} | {} | {:.2} | {} | {} |",
        setting,
        ceiling.len(),
        base.final_quality().map_or("–".into(), |q| fmt_q(q, base.evaluated().len())),
        pm(&ceiling, 3),
        wide.first().flops_per_token / base.first().flops_per_token.max(1.0),
        pm(&gains, 3),
        pm(&recovered, 2),
    )
}

/// The Table 3 analog: each Switch point whose init scale differs from a Switch point that is
/// otherwise the same (grid keys aside from `init_scale`), with both test qualities, the std
/// over seeds (the paper's stability measure) and the paired difference.
pub(crate) fn table3(md: &mut String, s: &Sweep) -> anyhow::Result<()> {
    let without_init = |g: &Group| -> Vec<String> {
        g.first().variant_items.iter().filter(|i| !i.starts_with("init_scale=")).cloned().collect()
    };
    let pairs: Vec<(&Group, &Group)> = s
        .groups
        .iter()
        .filter(|g| g.first().num_experts > 1 && g.first().variant_items.iter().any(|i| i.starts_with("init_scale=")))
        .filter_map(|g| {
            let other = s.groups.iter().find(|o| {
                o.first().num_experts == g.first().num_experts
                    && o.first().init_scale != g.first().init_scale
                    && without_init(o) == without_init(g)
                    && !o.first().variant_items.iter().any(|i| i.starts_with("init_scale="))
            })?;
            Some((other, g))
        })
        .collect();
    if pairs.is_empty() {
        return Ok(());
    }
    writeln!(md, "## Initialisation scale (paper: Table 3)\n")?;
    writeln!(md, "| Model | Init scale | Test quality (mean ± std over seeds) | Paired difference vs init {} | Paper mean | Paper std |\n|---|---|---|---|---|---|", pairs[0].0.first().init_scale)?;
    for (base, other) in pairs {
        for (g, diff) in [(base, None), (other, Some(other.paired_test_differences(base)))] {
            let p = paper::table3_row(g.first().init_scale);
            let failed = g.runs.iter().filter(|r| r.state == Some(State::Failed)).count();
            writeln!(
                md,
                "| {} | {} | {}{} | {} | {} | {} |",
                g.label(),
                g.first().init_scale,
                g.test_quality().map_or("–".into(), |q| format!("{:.3} ± {:.3}", q.0, q.1)),
                if failed > 0 { format!(" ({failed} failed)") } else { String::new() },
                diff.map_or("–".into(), |d| paired_test(&d).0),
                p.0,
                p.1
            )?;
        }
    }
    writeln!(md, "\nPaper: 32 experts, 3.5k steps, 3 seeds.\n")?;
    Ok(())
}

/// Routing health per sparse layer at the last evaluation.
pub(crate) fn routing_health(md: &mut String, s: &Sweep) -> anyhow::Result<()> {
    let Sweep { runs, .. } = *s;
    writeln!(md, "## Routing health\n")?;
    writeln!(md, "Per sparse layer at the last evaluation: expert load relative to uniform (1.00 = perfectly balanced), fraction of tokens dropped at the evaluation capacity factor, and the router's mean entropy ÷ ln(experts) (1.00 = a uniform router, whose top-1 gate is 1/experts and so scales the expert output down by that much).\n")?;
    writeln!(
        md,
        "| Run | Model | Layer | Min load | Max load | Dead experts | Dropped | Router entropy ÷ ln E |\n|---|---|---|---|---|---|---|---|"
    )?;
    let mut dead_total = 0;
    for r in runs.iter().filter(|r| r.compared() && r.num_experts > 1) {
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
                (rows[0].router_entropy / e.ln()).max(0.0) // a hash router's one-hot choice: −0.0
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

    Ok(())
}

/// Every run, with its state and final numbers.
pub(crate) fn runs_table(md: &mut String, s: &Sweep) -> anyhow::Result<()> {
    let Sweep { runs, .. } = *s;
    writeln!(md, "## Runs\n\n| Run | Point | Seed | State | Steps | Validation | Test | CPU s | Wall s | Tokens per CPU s | Note |\n|---|---|---|---|---|---|---|---|---|---|---|")?;
    for r in runs {
        // Both: a failed run's error does not hide that one of its files cannot be read.
        let note = [r.error.as_deref(), r.problem.as_deref()].into_iter().flatten().collect::<Vec<_>>().join("; ");
        let note = match r.diverged_at {
            Some(step) => format!("diverged at step {step:.0}. {note}"),
            None => note,
        };
        writeln!(
            md,
            "| {} | {} | {} | {} | {:.0}/{} | {} | {} | {:.1} | {:.1} | {} | {} |",
            r.id,
            r.group,
            r.seed,
            r.state_label(),
            r.final_step,
            r.steps_total,
            opt(r.final_quality(), 3),
            opt(r.test_quality, 3),
            r.final_cpu_s,
            r.final_wall_s,
            opt(r.tokens_per_s(), 0),
            note.replace('|', "/").replace('\n', " ")
        )?;
    }
    Ok(())
}

/// `summary.csv`: one row per run.
pub(crate) fn summary_csv(s: &Sweep) -> anyhow::Result<String> {
    let Sweep { runs, threshold, .. } = *s;
    // Superseded runs are listed in report.md's runs table and its header, not here.
    let runs = runs.iter().filter(|r| r.superseded_by.is_none());
    let mut csv = String::from("run_id,group,seed,state,is_baseline,num_experts,top_k,capacity_factor,init_scale,params_total,params_active,flops_per_token,flops_per_token_computed,final_step,final_neg_log_perplexity,test_neg_log_perplexity,steps_to_threshold,wall_s,cpu_s,tokens_per_cpu_s,examples_per_cpu_s,diverged_at\n");
    for r in runs {
        writeln!(
            csv,
            "{},\"{}\",{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            r.id,
            r.group,
            r.seed,
            r.state_label(),
            r.is_baseline,
            r.num_experts,
            r.top_k,
            r.capacity_factor,
            r.init_scale,
            r.params_total,
            r.params_active,
            r.flops_per_token,
            r.flops_per_token_computed,
            r.final_step,
            opt(r.final_quality(), 6),
            opt(r.test_quality, 6),
            threshold
                .and_then(|t| stats::first_crossing(&r.nlp_curve(), t))
                .map(|v| format!("{v:.1}"))
                .unwrap_or_default(),
            r.final_wall_s,
            r.final_cpu_s,
            opt(r.tokens_per_s(), 1),
            opt(r.examples_per_s(), 2),
            r.diverged_at.map(|s| format!("{s:.0}")).unwrap_or_default()
        )?;
    }
    Ok(csv)
}
