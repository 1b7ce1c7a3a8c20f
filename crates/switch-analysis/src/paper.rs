//! The paper's reported figures, shown beside ours (Fedus, Zoph, Shazeer 2021, arXiv 2101.03961v3).

/// Table 7, by number of experts: params, pre-trained neg log perplexity, gain over T5-Base.
/// The table gives Switch-Base parameter counts only; the expert counts are derived: 12 sparse
/// layers × E × 4.72M per GEGLU expert + ~0.2B shared gives 1.1B, 2.0B, 3.8B, 7.4B, 14.7B for
/// 16, 32, 64, 128, 256 experts.
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

/// Table 7's gains of Switch-Base over T5-Base, `(experts, nats)`: the paper's Fig. 1 (left)
/// scaling in the units of our paired gains.
pub const TABLE7_GAINS: [(f64, f64); 5] = [
    (16.0, 1.636 - 1.505),
    (32.0, 1.636 - 1.474),
    (64.0, 1.636 - 1.444),
    (128.0, 1.636 - 1.432),
    (256.0, 1.636 - 1.427),
];

/// A row of Table 1 (128 experts, T5-Base FLOPs, 100k steps): quality, hours to −1.50, examples/s.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Table1Row {
    pub model: &'static str,
    pub capacity_factor: Option<f64>,
    pub quality: &'static str,
    pub hours: &'static str,
    pub speed: &'static str,
}

const fn t1(
    model: &'static str,
    cf: Option<f64>,
    quality: &'static str,
    hours: &'static str,
    speed: &'static str,
) -> Table1Row {
    Table1Row { model, capacity_factor: cf, quality, hours, speed }
}

/// Table 1 as printed (T5-Large, at 3.5× the FLOPs, left out: no analog at equal FLOPs).
pub const TABLE1: &[Table1Row] = &[
    t1("T5-Base", None, "-1.731", "not achieved", "1600"),
    t1("MoE-Base", Some(2.0), "-1.547", "68.7", "840"),
    t1("Switch-Base", Some(2.0), "-1.554", "72.8", "860"),
    t1("MoE-Base", Some(1.25), "-1.559", "80.7", "790"),
    t1("Switch-Base", Some(1.25), "-1.553", "65.0", "910"),
    t1("MoE-Base", Some(1.0), "-1.572", "80.1", "860"),
    t1("Switch-Base", Some(1.0), "-1.561", "62.8", "1000"),
    t1("Switch-Base+", Some(1.0), "-1.534", "67.6", "780"),
];

/// The Table 1 row of the same kind as ours: dense → T5-Base; top-2 → MoE-Base and top-1 →
/// Switch-Base at the same capacity factor; a widened top-1 model (Switch+) → Switch-Base+.
pub fn table1_row_for(experts: u64, top_k: u64, capacity_factor: f64, widened: bool) -> Option<Table1Row> {
    let model = match (experts, top_k, widened) {
        (1, _, _) => "T5-Base",
        (_, 1, true) => "Switch-Base+",
        (_, 1, false) => "Switch-Base",
        (_, 2, _) => "MoE-Base",
        _ => return None,
    };
    let same_cf = |c: Option<f64>| experts == 1 || c.is_some_and(|c| (c - capacity_factor).abs() < 1e-9);
    TABLE1.iter().copied().find(|r| r.model == model && same_cf(r.capacity_factor))
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
