//! The curve of gain over dense against the number of experts, fitted seed by seed.
//!
//! With x = log₂ E, each seed's paired test gains are fitted by least squares to
//! gain = b·x + c·x² (no intercept: dense gains nothing over itself). b is the gain of the first
//! doubling's slope, c < 0 says returns diminish with each doubling. The spread of b and c over
//! seeds is the fit's uncertainty.
//!
//! ```
//! use switch_analysis::fit::fit_seed;
//! // gains 0.1·x − 0.01·x² at E = 2, 4, 8, 16
//! let pts: Vec<(f64, f64)> = [2.0f64, 4.0, 8.0, 16.0].iter().map(|e| { let x = e.log2(); (*e, 0.1 * x - 0.01 * x * x) }).collect();
//! let (b, c) = fit_seed(&pts).unwrap();
//! assert!((b - 0.1).abs() < 1e-12 && (c + 0.01).abs() < 1e-12);
//! // Two Switch sizes determine b and c exactly, whatever the gains: no fit.
//! assert!(fit_seed(&[(8.0, 0.19), (64.0, 0.24)]).is_none());
//! ```
use crate::stats::mean_std;

/// `(b, c)` of gain = b·log₂E + c·(log₂E)² through `(experts, gain)` points; `None` with fewer
/// than three distinct Switch sizes: with two, the two-parameter curve passes through both points
/// whatever they are, so it tests nothing (and its "returns diminish" would rest on two numbers).
pub fn fit_seed(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    let mut sizes: Vec<u64> = points.iter().filter(|p| p.0 > 1.0).map(|p| p.0.to_bits()).collect();
    sizes.sort_unstable();
    sizes.dedup();
    if sizes.len() < 3 {
        return None;
    }
    let (mut s2, mut s3, mut s4, mut sg1, mut sg2) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for &(e, g) in points {
        let x = e.log2();
        (s2, s3, s4, sg1, sg2) = (s2 + x * x, s3 + x * x * x, s4 + x.powi(4), sg1 + x * g, sg2 + x * x * g);
    }
    let det = s2 * s4 - s3 * s3;
    (det.abs() > 1e-12).then(|| ((sg1 * s4 - sg2 * s3) / det, (s2 * sg2 - s3 * sg1) / det))
}

/// The fits of one setting over its seeds.
pub struct GainFit {
    pub setting: String,
    /// `(seed, b, c)`.
    pub per_seed: Vec<(u64, f64, f64)>,
    pub max_experts: f64,
}

impl GainFit {
    /// From `(seed, experts, gain)` triples; `None` without two seeds that each have three Switch
    /// sizes.
    pub fn new(setting: String, gains: &[(u64, f64, f64)]) -> Option<Self> {
        let mut seeds: Vec<u64> = gains.iter().map(|g| g.0).collect();
        seeds.sort_unstable();
        seeds.dedup();
        let per_seed: Vec<(u64, f64, f64)> = seeds
            .into_iter()
            .filter_map(|s| {
                let pts: Vec<(f64, f64)> = gains.iter().filter(|g| g.0 == s).map(|g| (g.1, g.2)).collect();
                fit_seed(&pts).map(|(b, c)| (s, b, c))
            })
            .collect();
        let max_experts = gains.iter().map(|g| g.1).fold(1.0, f64::max);
        (per_seed.len() >= 2).then_some(GainFit { setting, per_seed, max_experts })
    }
    /// Mean ± std over seeds of b.
    pub fn b(&self) -> (f64, f64) {
        mean_std(&self.per_seed.iter().map(|p| p.1).collect::<Vec<_>>())
    }
    /// Mean ± std over seeds of c.
    pub fn c(&self) -> (f64, f64) {
        mean_std(&self.per_seed.iter().map(|p| p.2).collect::<Vec<_>>())
    }
    /// Whether c < 0 by more than two of its standard deviations over seeds.
    pub fn returns_diminish(&self) -> bool {
        let (c, sd) = self.c();
        c < 0.0 && c.abs() > 2.0 * sd
    }
    /// The gain of each doubling from 2^(x−1) to 2^x experts on the fitted curve (mean over the
    /// seeds' fits): b + c·(2x − 1).
    pub fn doubling_gain(&self, x: f64) -> (f64, f64) {
        mean_std(&self.per_seed.iter().map(|p| p.1 + p.2 * (2.0 * x - 1.0)).collect::<Vec<_>>())
    }
    /// `(experts, mean fitted gain, std over seeds)` from 1 to the largest count, for drawing.
    pub fn curve(&self) -> Vec<(f64, f64, f64)> {
        let top = self.max_experts.log2();
        (0..=40)
            .map(|i| {
                let x = top * i as f64 / 40.0;
                let (m, sd) = mean_std(&self.per_seed.iter().map(|p| p.1 * x + p.2 * x * x).collect::<Vec<_>>());
                (2f64.powf(x), m, sd)
            })
            .collect()
    }
}
