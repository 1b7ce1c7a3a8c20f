//! Judging a grid's claims ([`switch_rundir::claims`]) on its runs: quality claims on the test
//! split (scored once per run, after training), time and step claims on the seed-mean
//! validation curves (the only curves there are). Every verdict comes with the numbers it rests on.
use crate::{stats, Group, Sweep};
use std::fmt::Write as _;
use switch_rundir::claims::{Claim, ClaimTest, Selector};

#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Holds,
    Fails,
    /// Why it could not be judged (runs missing, a selector that names no point).
    NotMeasured(String),
}

/// A claim's verdict and its evidence, in words.
pub struct Judged<'c> {
    pub claim: &'c Claim,
    pub verdict: Verdict,
    pub evidence: String,
}

/// The single group `sel` names, or why not.
fn one<'a, 'b>(s: &'b Sweep<'a>, sel: &Selector, what: &str) -> Result<&'b Group<'a>, String> {
    let found: Vec<&Group> = s.groups.iter().filter(|g| g.selected_by(sel)).collect();
    match found.len() {
        1 => Ok(found[0]),
        n => Err(format!("{what} {} matches {n} points", serde_json::Value::Object(sel.clone()))),
    }
}

fn baseline_or<'a, 'b>(s: &'b Sweep<'a>, sel: Option<&Selector>, what: &str) -> Result<&'b Group<'a>, String> {
    match sel {
        Some(sel) => one(s, sel, what),
        None => s.baseline.ok_or_else(|| "the grid has no baseline".to_string()),
    }
}

fn q((m, sd): (f64, f64)) -> String {
    format!("{m:.3} ± {sd:.3}")
}

fn beats(s: &Sweep, point: &Selector, over: Option<&Selector>, by: f64) -> Result<(Verdict, String), String> {
    let (g, o) = (one(s, point, "point")?, baseline_or(s, over, "over")?);
    let d = g.paired_test_differences(o);
    if d.len() < 2 {
        return Err(format!("{} paired test score(s); needs 2 seeds", d.len()));
    }
    let (m, sd) = stats::mean_std(&d);
    let stds = if sd > 0.0 { m / sd } else { f64::INFINITY };
    let holds = m > 0.0 && stds > by;
    let evidence = format!(
        "{} {} vs {} {}: paired gain {m:+.3} ± {sd:.3} over {} seeds = {stds:.1} std (needs > {by})",
        g.label(),
        g.test_quality().map_or("–".into(), q),
        o.label(),
        o.test_quality().map_or("–".into(), q),
        d.len()
    );
    Ok((if holds { Verdict::Holds } else { Verdict::Fails }, evidence))
}

/// The value a group's point sets for `key`, as a number (the `from` group may leave it unset).
fn key_value(g: &Group, key: &str) -> Option<f64> {
    g.first().point.get(key).and_then(|v| v.as_f64())
}

fn improves_with(s: &Sweep, key: &str, among: &Selector, from: Option<&Selector>) -> Result<(Verdict, String), String> {
    let start = baseline_or(s, from, "from")?;
    let mut chain: Vec<&Group> = s.groups.iter().filter(|g| g.selected_by(among) && !std::ptr::eq(*g, start)).collect();
    chain.sort_by(|a, b| key_value(a, key).unwrap_or(f64::MIN).total_cmp(&key_value(b, key).unwrap_or(f64::MIN)));
    chain.insert(0, start);
    let qs: Vec<(String, Option<(f64, f64)>)> = chain
        .iter()
        .map(|g| (key_value(g, key).map_or(g.first().model_name(), |v| format!("{v}")), g.test_quality()))
        .collect();
    if let Some((name, _)) = qs.iter().find(|(_, q)| q.is_none()) {
        return Err(format!("{key} = {name} has no test score yet"));
    }
    let means: Vec<f64> = qs.iter().map(|(_, q)| q.expect("checked").0).collect();
    let rising = means.windows(2).filter(|w| w[1] > w[0]).count();
    let steps: Vec<String> = qs.iter().map(|(n, q)| format!("{n}: {:.3}", q.expect("checked").0)).collect();
    let paired_up = chain
        .windows(2)
        .filter(|w| {
            let d = w[1].paired_test_differences(w[0]);
            !d.is_empty() && stats::mean_std(&d).0 > 0.0
        })
        .count();
    let evidence = format!(
        "test means {}; {rising} of {} steps rise (paired: {paired_up})",
        steps.join(" < "),
        means.len().saturating_sub(1)
    );
    Ok((if rising + 1 == means.len() { Verdict::Holds } else { Verdict::Fails }, evidence))
}

fn sooner(s: &Sweep, point: &Selector, than: &Selector, by: Option<f64>) -> Result<(Verdict, String), String> {
    let (g, o) = (one(s, point, "point")?, one(s, than, "than")?);
    let t = s.threshold.ok_or("no threshold (no baseline curve)")?;
    // The steps where the seed-mean curves reach the threshold, and the seeds' mean CPU seconds there.
    let (sg, so) = (stats::first_crossing(&g.mean_points(), t), stats::first_crossing(&o.mean_points(), t));
    let (a, b) = (sg.and_then(|x| g.mean_cpu_at(x)), so.and_then(|x| o.mean_cpu_at(x)));
    let fmt = |v: Option<f64>| v.map_or("not reached".into(), |v| format!("{v:.1} CPU s"));
    let mut evidence = format!("to {t:.3}: {} {}, {} {}", g.label(), fmt(a), o.label(), fmt(b));
    let holds = match (a, b) {
        (Some(a), Some(b)) => a < b,
        (Some(_), None) => true,
        _ => false,
    };
    let beyond_noise = match (by, sg, so) {
        (Some(by), Some(sg), Some(so)) if holds => match time_margin(g, sg, o, so, by) {
            Ok((beyond, margin)) => {
                evidence += &margin;
                beyond
            }
            Err(why) => return Err(format!("{evidence}; {why}")),
        },
        (Some(_), Some(_), None) => {
            evidence += &format!("; {} never reaches it: no margin to measure", o.label());
            true
        }
        _ => true,
    };
    Ok((if holds && beyond_noise { Verdict::Holds } else { Verdict::Fails }, evidence))
}

/// Whether `g`'s CPU seconds saved against `o`, seed by seed (each run timed at its own group's
/// crossing step, `sg` and `so`), are positive by more than `by` sample std, and those numbers.
fn time_margin(g: &Group, sg: f64, o: &Group, so: f64, by: f64) -> Result<(bool, String), String> {
    let d = g.paired_cpu_savings(sg, o, so);
    if d.len() < 2 {
        return Err(format!("{} paired run time(s); the margin needs 2 seeds", d.len()));
    }
    let (m, sd) = stats::mean_std(&d);
    let stds = if sd > 0.0 { m / sd } else { f64::INFINITY };
    let numbers =
        format!("; paired saving {m:+.1} ± {sd:.1} CPU s over {} seeds = {stds:.1} std (needs > {by})", d.len());
    Ok((m > 0.0 && stds > by, numbers))
}

fn step_speedup(s: &Sweep, point: &Selector, at_least: f64) -> Result<(Verdict, String), String> {
    let g = one(s, point, "point")?;
    let base = s.baseline.ok_or("the grid has no baseline")?;
    let speedup = stats::step_speedup(&base.mean_points(), &g.mean_points());
    let evidence = match speedup {
        Some(x) => format!(
            "{} reaches {}'s final validation quality {x:.2}× sooner (needs ≥ {at_least}×)",
            g.label(),
            base.label()
        ),
        None => format!("{} never reaches {}'s final validation quality", g.label(), base.label()),
    };
    Ok((if speedup.is_some_and(|x| x >= at_least) { Verdict::Holds } else { Verdict::Fails }, evidence))
}

/// Judges every claim on the sweep's runs.
pub(crate) fn judge<'c>(s: &Sweep, claims: &'c [Claim]) -> Vec<Judged<'c>> {
    claims
        .iter()
        .map(|claim| {
            let result = match &claim.test {
                ClaimTest::Beats(b) => beats(s, &b.point, b.over.as_ref(), b.by_paired_std),
                ClaimTest::ImprovesWith(w) => improves_with(s, &w.key, &w.among, w.from.as_ref()),
                ClaimTest::Sooner(x) => sooner(s, &x.point, &x.than, x.by_paired_std),
                ClaimTest::StepSpeedup(x) => step_speedup(s, &x.point, x.at_least),
            };
            match result {
                Ok((verdict, evidence)) => Judged { claim, verdict, evidence },
                Err(why) => Judged { claim, verdict: Verdict::NotMeasured(why.clone()), evidence: why },
            }
        })
        .collect()
}

/// The claims table, when the grid states claims (or the reason they cannot be read).
pub(crate) fn claims_table(md: &mut String, s: &Sweep, claims: &Result<Vec<Claim>, String>) -> anyhow::Result<()> {
    let claims = match claims {
        Ok(c) if c.is_empty() => return Ok(()),
        Ok(c) => c,
        Err(e) => {
            writeln!(md, "## Claims\n\nThe grid's claims could not be read: {e}\n")?;
            return Ok(());
        }
    };
    writeln!(md, "## Claims\n")?;
    writeln!(md, "What the grid expects, judged on its runs: quality on the **test split** (scored once per run, after training; nothing was chosen on it), time and steps on the seed-mean **validation** curves (time = CPU seconds of each run's own threads).\n")?;
    writeln!(md, "| Claim | Verdict | Evidence |\n|---|---|---|")?;
    for j in judge(s, claims) {
        let verdict = match &j.verdict {
            Verdict::Holds => "**holds**".to_string(),
            Verdict::Fails => "**fails**".to_string(),
            Verdict::NotMeasured(_) => "not measured".to_string(),
        };
        writeln!(md, "| {} | {verdict} | {} |", j.claim.says.replace('|', "/"), j.evidence.replace('|', "/"))?;
    }
    writeln!(md)?;
    Ok(())
}
