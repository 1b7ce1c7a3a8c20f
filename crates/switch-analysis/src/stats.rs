//! Curve arithmetic behind the tables: quality at a step, threshold crossings, step speedup,
//! seed aggregation. Plain functions on `(step, value)` points, tested with known answers.
//!
//! ```
//! use switch_analysis::stats::{first_crossing, step_speedup};
//! // the run reaches −2.0 halfway between steps 100 (−2.2) and 200 (−1.8): step 150
//! let run = [(100.0, -2.25), (200.0, -1.75)];
//! assert_eq!(first_crossing(&run, -2.0), Some(150.0));
//! let dense = [(100.0, -2.5), (200.0, -2.25), (300.0, -2.0)];
//! // dense ends at −2.0 (first reached at step 300); the run gets there at 150: 2× fewer steps
//! assert_eq!(step_speedup(&dense, &run), Some(2.0));
//! ```

/// Value at the last point with x ≤ `at` (the quality "after N steps").
pub fn value_at(curve: &[(f64, f64)], at: f64) -> Option<f64> {
    curve.iter().rev().find(|(x, _)| *x <= at).map(|p| p.1)
}

/// First x where the curve reaches `threshold` (rising), interpolated linearly between points.
pub fn first_crossing(curve: &[(f64, f64)], threshold: f64) -> Option<f64> {
    let mut prev: Option<(f64, f64)> = None;
    for &(x, y) in curve {
        if y >= threshold {
            return Some(match prev {
                Some((px, py)) if py < threshold => px + (threshold - py) / (y - py) * (x - px),
                _ => x,
            });
        }
        prev = Some((x, y));
    }
    None
}

/// The curve's value at `x`, linear between points; `None` outside its range.
pub fn interpolate(curve: &[(f64, f64)], x: f64) -> Option<f64> {
    let i = curve.iter().position(|p| p.0 >= x)?;
    let (x1, y1) = curve[i];
    if x1 == x {
        return Some(y1);
    }
    let (x0, y0) = *curve.get(i.checked_sub(1)?)?;
    Some(y0 + (x - x0) / (x1 - x0) * (y1 - y0))
}

/// Steps the baseline needs to reach its own final quality ÷ steps the run needs to reach it
/// (the paper's "7.5× step speedup"); `None` if the run never gets there.
pub fn step_speedup(baseline: &[(f64, f64)], run: &[(f64, f64)]) -> Option<f64> {
    let target = baseline.last()?.1;
    let base_steps = first_crossing(baseline, target)?;
    let run_steps = first_crossing(run, target)?;
    Some(base_steps / run_steps)
}

/// Mean and sample standard deviation (0 for a single value).
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 { values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

/// Point-wise mean and std of several curves over the x values they all share.
pub fn mean_curve(curves: &[Vec<(f64, f64)>]) -> Vec<(f64, f64, f64)> {
    let Some(first) = curves.first() else { return vec![] };
    first
        .iter()
        .filter_map(|&(x, _)| {
            let ys: Option<Vec<f64>> = curves.iter().map(|c| c.iter().find(|p| p.0 == x).map(|p| p.1)).collect();
            ys.map(|ys| {
                let (m, s) = mean_std(&ys);
                (x, m, s)
            })
        })
        .collect()
}
