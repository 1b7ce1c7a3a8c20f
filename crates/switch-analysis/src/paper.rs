//! The paper's reported figures, shown beside ours (Fedus, Zoph, Shazeer 2021, arXiv 2101.03961v3).

/// Table 7 (expert counts mapped from parameter counts, see the reference notes): params,
/// pre-trained neg log perplexity, gain over T5-Base.
pub fn experts_row(experts: u64) -> (String, String, String) {
    let row = |p: &str, q: f64| (p.to_string(), format!("{q:.3}"), format!("{:+.3}", q + 1.636));
    match experts {
        1 => ("223M".into(), "-1.636".into(), "–".into()),
        16 => row("1.1B", -1.505),
        32 => row("2.0B", -1.474),
        64 => row("3.8B", -1.444),
        128 => row("7.4B", -1.432),
        256 => row("14.7B", -1.427),
        2 | 4 | 8 => ("–".into(), "better than T5-Base (Fig. 12)".into(), "> 0".into()),
        _ => ("–".into(), "–".into(), "–".into()),
    }
}

/// Table 1 (128 experts, 100k steps): quality, hours to −1.50, examples/s.
pub fn table1_row(experts: u64, top_k: u64, capacity_factor: f64) -> (String, String, String) {
    let r = |q: &str, h: &str, s: &str| (q.to_string(), h.to_string(), s.to_string());
    match (experts > 1, top_k, (capacity_factor * 100.0).round() as i64) {
        (false, _, _) => r("-1.731 (T5-Base)", "not achieved", "1600"),
        (true, 1, 200) => r("-1.554", "72.8", "860"),
        (true, 1, 125) => r("-1.553", "65.0", "910"),
        (true, 1, 100) => r("-1.561", "62.8", "1000"),
        (true, 2, 200) => r("-1.547", "68.7", "840"),
        (true, 2, 125) => r("-1.559", "80.7", "790"),
        (true, 2, 100) => r("-1.572", "80.1", "860"),
        _ => r("–", "–", "–"),
    }
}

/// Table 3 (32 experts, 3.5k steps, 3 seeds): mean and std of neg log perplexity.
pub fn table3_row(init_scale: f64) -> (String, String) {
    if (init_scale - 0.1).abs() < 1e-9 {
        ("-2.72".into(), "0.01".into())
    } else if (init_scale - 1.0).abs() < 1e-9 {
        ("-3.60".into(), "0.68".into())
    } else {
        ("–".into(), "–".into())
    }
}
