//! A grid's claims: what it expects its runs to show, stated as data (`claims:` in the grid
//! file), checked against the grid's points when it is planned and judged by the report on the
//! test split. One definition, read by the runner and the analysis alike.
//!
//! ```yaml
//! claims:
//!   - says: Switch-8 beats dense at equal FLOPs
//!     beats: {point: {model.num_experts: 8}, by_paired_std: 2}
//!   - says: quality improves with each doubling of experts
//!     improves_with: {key: model.num_experts, among: {model.router_init_scale: 10.0}}
//!   - says: capacity factor 1.25 reaches dense quality sooner than 2.0 (CPU time)
//!     sooner: {point: {model.capacity_factor: 1.25}, than: {model.capacity_factor: 2.0}}
//!   - says: the same, by more than the timing noise between seeds
//!     sooner: {point: {model.capacity_factor: 1.25}, than: {model.capacity_factor: 2.0}, by_paired_std: 2}
//!   - says: Switch-64 reaches dense quality at least 2× sooner in steps
//!     step_speedup: {point: {model.num_experts: 64}, at_least: 2.0}
//! ```
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Selects grid points by the keys they set (see [`selector_matches`]).
pub type Selector = Map<String, Value>;

/// Whether a point (the grid keys it sets) sets every key of `selector` to its value; a `null`
/// in the selector matches a point that leaves the key unset. Numbers compare by value (8 = 8.0).
pub fn selector_matches(point: &Map<String, Value>, selector: &Selector) -> bool {
    selector.iter().all(|(k, v)| match point.get(k) {
        Some(p) => match (p.as_f64(), v.as_f64()) {
            (Some(x), Some(y)) => x == y,
            _ => p == v,
        },
        None => v.is_null(),
    })
}

/// One claim: the sentence it makes and the test that decides it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claim {
    pub says: String,
    #[serde(flatten)]
    pub test: ClaimTest,
}

/// The tests a claim can make. Each names points by [`Selector`]s; a selector that matches no
/// point of its grid is refused when the grid is planned.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimTest {
    /// `point` ends above `over` (default: the baseline) on the test split by more than
    /// `by_paired_std` (default 2) standard deviations of the per-seed differences.
    Beats(Beats),
    /// Ordered by `key`, the points matching `among`, after `from` (default: the baseline), each
    /// end above the one before on the test split (seed means).
    ImprovesWith(ImprovesWith),
    /// `point` reaches the baseline's final validation quality in fewer CPU seconds than `than`
    /// (seed-mean curves; a run that never reaches it is slowest). With `by_paired_std` k, the
    /// mean of the CPU seconds saved seed by seed must also exceed k × their sample std (no margin
    /// can be measured when `than` never reaches it; the evidence says so).
    Sooner(Sooner),
    /// `point` reaches the baseline's final validation quality at least `at_least` × sooner in
    /// steps than the baseline (the paper's "7.5× step speedup").
    StepSpeedup(StepSpeedup),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Beats {
    pub point: Selector,
    #[serde(default)]
    pub over: Option<Selector>,
    #[serde(default = "two")]
    pub by_paired_std: f64,
}

fn two() -> f64 {
    2.0
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImprovesWith {
    pub key: String,
    pub among: Selector,
    #[serde(default)]
    pub from: Option<Selector>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sooner {
    pub point: Selector,
    pub than: Selector,
    /// The margin in sample standard deviations of the CPU seconds saved seed by seed (each
    /// group's runs timed at the step where that group's seed-mean curve reaches the threshold);
    /// none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_paired_std: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpeedup {
    pub point: Selector,
    pub at_least: f64,
}

impl Claim {
    /// Every selector of the claim, named by its place (`beats.point`, …), and whether it must
    /// name exactly one grid point (all but `improves_with.among` must), for checks.
    pub fn selectors(&self) -> Vec<(&'static str, &Selector, bool)> {
        let mut out: Vec<(&'static str, &Selector, bool)> = match &self.test {
            ClaimTest::Beats(b) => vec![("beats.point", &b.point, true)],
            ClaimTest::ImprovesWith(i) => vec![("improves_with.among", &i.among, false)],
            ClaimTest::Sooner(s) => vec![("sooner.point", &s.point, true), ("sooner.than", &s.than, true)],
            ClaimTest::StepSpeedup(s) => vec![("step_speedup.point", &s.point, true)],
        };
        match &self.test {
            ClaimTest::Beats(b) => out.extend(b.over.as_ref().map(|s| ("beats.over", s, true))),
            ClaimTest::ImprovesWith(i) => out.extend(i.from.as_ref().map(|s| ("improves_with.from", s, true))),
            _ => {}
        }
        out
    }

    /// Problems a claim has on its own (non-finite numbers), as `key: problem`.
    pub fn problems(&self) -> Vec<String> {
        match &self.test {
            ClaimTest::Beats(b) if !(b.by_paired_std.is_finite() && b.by_paired_std >= 0.0) => {
                vec![format!("beats.by_paired_std = {}: use a number ≥ 0, e.g. 2", b.by_paired_std)]
            }
            ClaimTest::Sooner(Sooner { by_paired_std: Some(k), .. }) if !(k.is_finite() && *k >= 0.0) => {
                vec![format!("sooner.by_paired_std = {k}: use a number ≥ 0, e.g. 2")]
            }
            ClaimTest::StepSpeedup(s) if !(s.at_least.is_finite() && s.at_least > 0.0) => {
                vec![format!("step_speedup.at_least = {}: use a number > 0, e.g. 2", s.at_least)]
            }
            _ => vec![],
        }
    }
}

/// The claims of the grid a sweep ran (its copy `grid.yaml` in the sweep folder); empty when it
/// states none. An unreadable list is an error naming the file.
pub fn grid_claims(sweep_dir: &std::path::Path) -> Result<Vec<Claim>, String> {
    let path = sweep_dir.join("grid.yaml");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(vec![]) };
    let grid: Value = serde_saphyr::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    match grid.get("claims") {
        None | Some(Value::Null) => Ok(vec![]),
        Some(c) => serde_json::from_value(c.clone()).map_err(|e| format!("{}: claims: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_read_from_yaml_and_selectors_match_like_the_grid() {
        let yaml = "- says: S8 beats dense\n  beats: {point: {model.num_experts: 8}}\n- says: more is better\n  improves_with: {key: model.num_experts, among: {model.router_init_scale: 10}}\n";
        let claims: Vec<Claim> = serde_saphyr::from_str(yaml).unwrap();
        let ClaimTest::Beats(b) = &claims[0].test else { panic!("{claims:?}") };
        assert_eq!((b.by_paired_std, b.over.is_none()), (2.0, true));
        assert_eq!(claims[1].selectors()[0].0, "improves_with.among");
        let point: Map<String, Value> = serde_json::from_str(r#"{"model.num_experts": 8.0}"#).unwrap();
        assert!(selector_matches(&point, &b.point));
        let unset: Selector = serde_json::from_str(r#"{"model.d_ff": null}"#).unwrap();
        assert!(selector_matches(&point, &unset));
        let typo = "- says: x\n  beats: {pont: {model.num_experts: 8}}\n";
        assert!(serde_saphyr::from_str::<Vec<Claim>>(typo).is_err(), "an unknown field is refused");
    }

    #[test]
    fn a_time_claims_margin_is_optional_and_must_be_a_number_at_least_zero() {
        let sooner = |margin: &str| -> Claim {
            let yaml = format!("says: x\nsooner: {{point: {{a: 1}}, than: {{a: 2}}{margin}}}\n");
            serde_saphyr::from_str(&yaml).unwrap()
        };
        let margin = |c: &Claim| match &c.test {
            ClaimTest::Sooner(s) => s.by_paired_std,
            other => panic!("{other:?}"),
        };
        let (plain, two) = (sooner(""), sooner(", by_paired_std: 2"));
        assert_eq!((margin(&plain), margin(&two)), (None, Some(2.0)));
        assert!(plain.problems().is_empty() && two.problems().is_empty());
        assert!(!serde_json::to_string(&plain).unwrap().contains("by_paired_std"), "written as it was read");
        assert_eq!(sooner(", by_paired_std: -1").problems(), ["sooner.by_paired_std = -1: use a number ≥ 0, e.g. 2"]);
    }
}
