//! Reports on synthetic run folders whose answers are known by construction.
use std::path::Path;
use switch_analysis::synthetic::SyntheticRun;
use switch_analysis::{report, runs, stats, ReportOptions};

/// Writes a run folder whose eval curve is `nlp(step)` at steps 100, 200, …, `steps`.
fn write_run(dir: &Path, id: &str, experts: u64, seed: u64, steps: u64, nlp: impl Fn(f64) -> f64, state: &str) {
    write_run_at(dir, id, "", experts, seed, steps, nlp, state)
}

/// As [`write_run`], at a grid point that also sets `setting` (`"  key: value\n"` lines).
fn write_run_at(
    dir: &Path,
    id: &str,
    setting: &str,
    experts: u64,
    seed: u64,
    steps: u64,
    nlp: impl Fn(f64) -> f64,
    state: &str,
) {
    let setting = setting
        .lines()
        .map(|l| {
            let (k, v) = l.trim().split_once(": ").unwrap();
            (k, serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.into())))
        })
        .collect();
    let state = serde_json::from_value(serde_json::Value::String(state.into())).unwrap();
    SyntheticRun { setting, state, ..SyntheticRun::new(id, experts, seed, steps) }.write(dir, nlp).unwrap();
}

#[test]
fn curve_arithmetic_has_known_answers() {
    let dense: Vec<(f64, f64)> = (1..=10).map(|i| (i as f64 * 100.0, -3.0 + 0.1 * i as f64)).collect();
    // Quality at N: the last evaluation at or before N.
    assert_eq!(stats::value_at(&dense, 550.0), Some(-3.0 + 0.5));
    assert_eq!(stats::value_at(&dense, 50.0), None);
    // Dense ends at −2.0 at step 1000; a run twice as fast per step reaches it at step 500.
    let fast: Vec<(f64, f64)> = (1..=10).map(|i| (i as f64 * 100.0, -3.0 + 0.2 * i as f64)).collect();
    assert!((stats::first_crossing(&fast, -2.0).unwrap() - 500.0).abs() < 1e-9);
    assert!((stats::step_speedup(&dense, &fast).unwrap() - 2.0).abs() < 1e-9);
    assert_eq!(stats::step_speedup(&fast, &dense), None, "never reached");
    let (m, s) = stats::mean_std(&[1.0, 2.0, 3.0]);
    assert_eq!((m, s), (2.0, 1.0));
    let mc = stats::mean_curve(&[vec![(1.0, 1.0), (2.0, 3.0)], vec![(1.0, 3.0), (2.0, 5.0), (3.0, 9.0)]]);
    assert_eq!(mc, vec![(1.0, 2.0, 2f64.sqrt()), (2.0, 4.0, 2f64.sqrt())]);
}

#[test]
fn report_on_synthetic_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("synthetic");
    // Dense: −3 + s/1000 (reaches −2.0 at 1000). Switch-4, two seeds: slopes 2/1000 and 2/1000 ± 0.
    write_run(&dir, "dense0", 1, 0, 1000, |s| -3.0 + s / 1000.0, "done");
    write_run(&dir, "sw4s0", 4, 0, 1000, |s| -3.0 + 2.0 * s / 1000.0 - 0.05, "done");
    write_run(&dir, "sw4s1", 4, 1, 1000, |s| -3.0 + 2.0 * s / 1000.0 + 0.05, "done");
    // A run killed mid-write: truncated last line, no status.
    write_run(&dir, "sw8s0", 8, 0, 400, |s| -3.0 + 3.0 * s / 1000.0, "running");
    let m = dir.join("runs/sw8s0/metrics.csv");
    let text = std::fs::read_to_string(&m).unwrap();
    std::fs::write(&m, &text[..text.len() - 7]).unwrap();
    // A run that failed before logging anything.
    write_run(&dir, "sw16s0", 16, 0, 1000, |s| s, "failed");
    std::fs::remove_file(dir.join("runs/sw16s0/metrics.csv")).unwrap();

    let runs = runs::load(&dir).unwrap();
    assert_eq!(runs.len(), 5);
    let sw8 = runs.iter().find(|r| r.id == "sw8s0").unwrap();
    assert_eq!(sw8.curve.len(), 3, "rows before the torn line are kept");
    assert_eq!(runs.iter().find(|r| r.id == "sw16s0").unwrap().problem.as_deref(), Some("metrics.csv is missing"));

    // The grid's description, from the sweep folder's copy of the grid, heads the report.
    std::fs::write(dir.join("grid.yaml"), "name: synthetic\ndescription: |\n  Line one.\n  Line two.\n").unwrap();
    let md_path = report(&dir, &ReportOptions { threshold: None, at_step: None }).unwrap();
    let md = std::fs::read_to_string(&md_path).unwrap();
    assert!(md.contains("# Sweep `synthetic`\n\n> Line one.\n> Line two.\n\n"), "{md}");
    assert!(md.contains("**Engine:** kernels not recorded in every run"), "configs without train.kernels: {md}");
    // Switch-4's seed mean is −3 + 2s/1000: it reaches dense's final −2.0 at step 500, a 2× speedup,
    // and its final quality is −1.0 ± 0.071 (two seeds ±0.05).
    // Its test quality is 0.02 lower (synthetic::TEST_GAP); one dense seed pairs with seed 0 only:
    // (−1.05 − 0.02) − (−2.0 − 0.02) = +0.950, with no std. Computed FLOPs: 5400 ÷ 5100.
    assert!(
        md.contains(
            "| Switch-4, cf 1.25 | 4 | 4000 | 1.00 / 1.06 | -1.000 ± 0.071 | -1.020 ± 0.071 | +0.950 | – | 2.00× |"
        ),
        "{md}"
    );
    assert!(md.contains("| Dense | 1 |"), "{md}");
    // Table 1 analog: test quality, validation @1000 steps, steps to the dense final quality
    // (mean over seeds: 525 and 475), CPU seconds (step ÷ 20) at that step.
    assert!(
        md.contains("| Switch-4 | preset | 1.25 | 1.00 / 1.06 | -1.020 ± 0.071 | -1.000 ± 0.071 | 500 | 25.0 |"),
        "{md}"
    );
    assert!(md.contains("| sw16s0 |") && md.contains("failed") && md.contains("metrics.csv is missing"), "{md}");
    assert!(md.contains("| sw8s0 |") && md.contains("running"), "{md}");
    assert!(md.contains("No expert has zero load"));
    // Routing health: 4 experts at 1/4 load each, 1% dropped, router entropy 0.5 nats ÷ ln 4 = 0.36.
    assert!(md.contains("| sw4s0 | Switch-4 | encoder.1 | 1.00 | 1.00 | 0 | 1.0% | 0.36 |"), "{md}");
    for f in ["quality_vs_step", "quality_vs_params", "quality_vs_time", "routing_min_load", "routing_drop_fraction"] {
        for ext in ["png", "svg"] {
            let p = dir.join("report").join(format!("{f}.{ext}"));
            assert!(std::fs::metadata(&p).map(|m| m.len() > 1000).unwrap_or(false), "{}", p.display());
        }
    }
    let svg = std::fs::read_to_string(dir.join("report/quality_vs_step.svg")).unwrap();
    assert!(svg.contains("Switch-4") && svg.contains("training step"), "labels are drawn as text");
    let csv = std::fs::read_to_string(dir.join("report/summary.csv")).unwrap();
    assert_eq!(csv.lines().count(), 6);
    assert!(csv.lines().any(|l| l.starts_with("sw4s0,") && l.contains(",done,") && l.contains(",525.0,")), "{csv}");
}

#[test]
fn lever_study_compares_each_setting_with_its_own_dense() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("study");
    let lr = "  train.learning_rate: 0.01\n";
    let alpha = "  model.balance_loss_coef: 0.001\n";
    // Final qualities (step 500 = 5 × 100): dense −2.0; dense at lr 0.01 −1.5.
    for seed in 0..2 {
        let jitter = if seed == 0 { -0.01 } else { 0.01 }; // seed std 0.01·√2
        write_run(&dir, &format!("d{seed}"), 1, seed, 500, move |s| -2.5 + s / 1000.0 + jitter, "done");
        write_run_at(&dir, &format!("dl{seed}"), lr, 1, seed, 500, move |s| -2.0 + s / 1000.0 + jitter, "done");
        // Switch-8 at lr 0.01: +0.1 over *its* dense (−1.4), not over the baseline (−2.0).
        write_run_at(&dir, &format!("sl{seed}"), lr, 8, seed, 500, move |s| -1.9 + s / 1000.0 + jitter, "done");
        // A router-only setting has no dense of its own: compared with the baseline, −0.05.
        write_run_at(&dir, &format!("sa{seed}"), alpha, 8, seed, 500, move |s| -2.55 + s / 1000.0 + jitter, "done");
        // Both: compared with the lr-0.01 dense, the closest one, +0.2.
        let both = format!("{lr}{alpha}");
        write_run_at(&dir, &format!("sb{seed}"), &both, 8, seed, 500, move |s| -1.8 + s / 1000.0 + jitter, "done");
    }
    let md = report_md(&dir);
    let section = md.split("## Gain over dense, setting by setting").nth(1).expect("study section").to_string();
    let row = |setting: &str| {
        section
            .lines()
            .find(|l| l.starts_with(&format!("| {setting} |")))
            .unwrap_or_else(|| panic!("{setting}: {section}"))
            .to_string()
    };
    // Separation = gain ÷ (2 × 0.01·√2) = gain × 35.36.
    let lr_row = row("learning_rate=0.01");
    assert!(lr_row.contains("| -1.500 ± 0.014 | -1.400 ± 0.014 | +0.100 | 3.54 |"), "{lr_row}");
    let alpha_row = row("balance_loss_coef=0.001");
    assert!(alpha_row.contains("| -2.000 ± 0.014 | -2.050 ± 0.014 | -0.050 | -1.77 |"), "{alpha_row}");
    let both_row = row("learning_rate=0.01 balance_loss_coef=0.001");
    assert!(both_row.contains("| -1.500 ± 0.014 | -1.300 ± 0.014 | +0.200 | 7.07 |"), "{both_row}");
    assert!(std::fs::metadata(dir.join("report/gain_vs_step.svg")).map(|m| m.len() > 1000).unwrap_or(false));
    // The experts table uses the same pairing.
    assert!(md.contains("| Switch-8, cf 1.25 [learning_rate=0.01] | 8 |"), "{md}");
}

/// Per-seed differences, and the width ceiling: dense at the base width (d_ff 4), dense 2× and
/// 4× wider (the ceilings) and Switch-2 / Switch-4 at the base width, three seeds.
#[test]
fn paired_gains_and_the_width_ceiling_are_computed_seed_by_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ceiling");
    let noise = [0.0, 0.3, -0.3]; // seed noise shared by every arm of a seed: cancels when paired
    for (seed, n) in noise.into_iter().enumerate() {
        let seed = seed as u64;
        let arm = |id: &str, experts: u64, d_ff: u64, end: f64| {
            let setting = if d_ff == 4 { String::new() } else { format!("  model.d_ff: {d_ff}\n") };
            let id = format!("{id}{seed}");
            // At seed 2, Switch-4 gains 0.04 more than at the other seeds.
            let extra = if id == "s42" { 0.04 } else { 0.0 };
            write_run_at(
                &dir,
                &id,
                &setting,
                experts,
                seed,
                200,
                move |s| end + n + extra + (s - 200.0) / 1000.0,
                "done",
            );
            set_model(&dir, &id, "d_ff", &d_ff.to_string());
        };
        arm("d", 1, 4, -2.0);
        arm("w2", 1, 8, -1.8); // ceiling for 2 experts: +0.2
        arm("w4", 1, 16, -1.6); // ceiling for 4 experts: +0.4
        arm("s2", 2, 4, -1.9); // recovers half of it
        arm("s4", 4, 4, -1.9); // +0.1 (+0.14 at seed 2): a quarter (0.35 at seed 2)
    }
    let md = report_md(&dir);
    // Unpaired, the seed noise (std 0.3) swamps the +0.1 gain; paired, it is exact for Switch-2.
    let study = md.split("## Gain over dense, setting by setting").nth(1).expect("study section").to_string();
    let s2 = study.lines().find(|l| l.starts_with("| preset | Switch-2 |")).unwrap_or_else(|| panic!("{study}"));
    assert!(s2.contains("| -2.000 ± 0.300 | -1.900 ± 0.300 | +0.100 | 0.17 | +0.100 ± 0.000 | exact |"), "{s2}");
    // Switch-4: differences 0.1, 0.1, 0.14: mean 0.1133, std 0.0231, separation 0.1133 / 0.0462 = 2.45.
    let s4 = study.lines().find(|l| l.starts_with("| preset | Switch-4 |")).unwrap();
    assert!(s4.contains("| +0.113 ± 0.023 | 2.45 |"), "{s4}");
    let ceiling = md.split("## How much of the width ceiling do experts recover").nth(1).expect("ceiling").to_string();
    let row = |e: &str| ceiling.lines().find(|l| l.starts_with(&format!("| preset | {e} |"))).unwrap().to_string();
    assert!(row("2").contains("| 3 | -2.000 ± 0.300 | +0.200 ± 0.000 |"), "{ceiling}");
    assert!(row("2").ends_with("| +0.100 ± 0.000 | +0.50 ± 0.00 |"), "{ceiling}");
    // Recovered at seed 2: 0.14 / 0.4 = 0.35; mean of 0.25, 0.25, 0.35 = 0.283, std 0.058.
    // The 4×-wide dense is not measured against the 2×-wide one: ceilings start at the narrowest.
    assert_eq!(ceiling.lines().filter(|l| l.starts_with("| preset |")).count(), 2, "{ceiling}");
    assert!(
        row("4").contains("| +0.400 ± 0.000 |") && row("4").ends_with("| +0.113 ± 0.023 | +0.28 ± 0.06 |"),
        "{ceiling}"
    );
    // The experts table pairs the test scores: every seed gains the same, so the std is 0.
    assert!(md.contains("| +0.100 ± 0.000 | exact |"), "{md}");
}

#[test]
fn a_grid_without_a_dense_model_has_no_study_section() {
    // Like experiments/init.yaml: Switch-8 at two init scales, no dense run to compare with.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("init");
    for (i, scale) in ["0.1", "1.0"].iter().enumerate() {
        let setting = format!("  model.init_scale: {scale}\n");
        write_run_at(&dir, &format!("s{i}"), &setting, 8, 0, 300, move |s| -3.0 + s / 1000.0 - i as f64, "done");
    }
    let md = report_md(&dir);
    assert!(!md.contains("Gain over dense, setting by setting"), "{md}");
    assert!(!dir.join("report/gain_vs_step.png").exists());
    assert!(md.contains("| Switch-8, cf 1.25 [init_scale=1.0] | 8 | 8000 | – | -3.700 | -3.720 | – | – |"), "{md}");
}

#[test]
fn table1_reads_thresholds_off_seed_mean_curves_and_prints_each_paper_row_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("synthetic");
    // Dense, two seeds at −3 + s/1000 ∓ 0.05: the seed mean ends at −2.0 at step 1000, which the
    // lower seed alone never reaches. CPU time is step/20 s.
    write_run(&dir, "d0", 1, 0, 1000, |s| -3.0 + s / 1000.0 - 0.05, "done");
    write_run(&dir, "d1", 1, 1, 1000, |s| -3.0 + s / 1000.0 + 0.05, "done");
    // Switch-4 and Switch-8, seed means −3 + 1.6·s/1000: −2.0 at step 625, between evaluations 600 and 700.
    for (e, id) in [(4, "s4"), (8, "s8")] {
        write_run(&dir, &format!("{id}a"), e, 0, 1000, |s| -3.0 + 1.6 * s / 1000.0 - 0.02, "done");
        write_run(&dir, &format!("{id}b"), e, 1, 1000, |s| -3.0 + 1.6 * s / 1000.0 + 0.02, "done");
    }
    report(&dir, &ReportOptions { threshold: None, at_step: None }).unwrap();
    let md = std::fs::read_to_string(dir.join("report/report.md")).unwrap();
    let table = md.split("## Switch vs MoE vs dense").nth(1).unwrap();
    let row = |name: &str| table.lines().find(|l| l.starts_with(&format!("| {name} |"))).unwrap().to_string();
    assert!(row("Dense").contains("| 1000 | 50.0 |"), "dense reaches its own mean: {}", row("Dense"));
    assert!(row("Switch-4").contains("| 625 | 31."), "{}", row("Switch-4"));
    assert!(row("Switch-4").ends_with("| Switch-Base |"), "{}", row("Switch-4"));
    // The paper's rows, each once: Switch-Base at 1.25 names both of ours; rows we lack say so.
    let paper = table.split("The paper's Table 1").nth(1).unwrap();
    assert_eq!(paper.matches("| Switch-Base | 1.25 |").count(), 1);
    assert!(
        paper.contains("| Switch-Base | 1.25 | -1.553 | 65.0 | 910 | Switch-4, cf 1.25; Switch-8, cf 1.25 |"),
        "{paper}"
    );
    assert!(paper.contains("| T5-Base | – | -1.731 | not achieved | 1600 | Dense |"));
    assert!(paper.contains("| MoE-Base | 2.0 | -1.547 | 68.7 | 840 | not in this grid |"));
    assert_eq!(md.matches("-1.553").count(), 1, "the paper's Switch-Base number appears once");
}

#[test]
fn quality_vs_step_is_framed_after_the_first_evaluation_and_kept_in_full() {
    use switch_analysis::plots::{after_first, color, Series};
    // first evaluation at −9, the rest between −3 and −2: the framed figure starts at the second
    let mut s = Series::line("a", vec![(100.0, -9.0), (200.0, -3.0), (300.0, -2.0)], color(0));
    s.band = vec![(100.0, -9.5, -8.5), (200.0, -3.1, -2.9), (300.0, -2.1, -1.9)];
    let framed = after_first(vec![s]);
    assert_eq!(framed[0].points, vec![(200.0, -3.0), (300.0, -2.0)]);
    assert_eq!(framed[0].band, vec![(200.0, -3.1, -2.9), (300.0, -2.1, -1.9)]);

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("synthetic");
    write_run(&dir, "d0", 1, 0, 500, |s| if s <= 100.0 { -9.0 } else { -3.0 + s / 1000.0 }, "done");
    report(&dir, &ReportOptions { threshold: None, at_step: None }).unwrap();
    for stem in ["quality_vs_step", "quality_vs_step_full"] {
        assert!(dir.join(format!("report/{stem}.png")).exists() && dir.join(format!("report/{stem}.svg")).exists());
    }
    let md = std::fs::read_to_string(dir.join("report/report.md")).unwrap();
    assert!(md.contains("(quality_vs_step_full.png)"));
}

/// The Markdown report of `dir` with the default options, written and read back.
fn report_md(dir: &Path) -> String {
    std::fs::read_to_string(report(dir, &ReportOptions { threshold: None, at_step: None }).unwrap()).unwrap()
}

/// Sets `model.<key>` in a synthetic run's resolved config (adding it when absent).
fn set_model(dir: &Path, id: &str, key: &str, value: &str) {
    let path = dir.join("runs").join(id).join("config.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let model = lines.iter().position(|l| l == "model:").unwrap();
    let line = format!("  {key}: {value}");
    match lines.iter().skip(model).position(|l| l.starts_with(&format!("  {key}:"))) {
        Some(i) => lines[model + i] = line,
        None => lines.insert(model + 1, line),
    }
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
}

#[test]
fn table1_matches_paper_rows_by_kind_capacity_factor_and_width() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("capacity");
    let q = |s: f64| -3.0 + s / 1000.0;
    // As experiments/capacity.yaml: dense at d_model 64, Switch and top-2 MoE at capacity factor 1.0,
    // and Switch+, whose point sets a wider d_model (solved to the MoE's FLOPs).
    write_run(&dir, "dense", 1, 0, 300, q, "done");
    write_run_at(&dir, "sw", "  model.capacity_factor: 1.0\n", 8, 0, 300, q, "done");
    write_run_at(&dir, "moe", "  model.top_k: 2\n  model.capacity_factor: 1.0\n", 8, 0, 300, q, "done");
    write_run_at(&dir, "plus", "  model.capacity_factor: 1.0\n  model.d_model: 80\n", 8, 0, 300, q, "done");
    // As experiments/study.yaml: a narrower dense and Switch pair, both setting d_model 32.
    write_run_at(&dir, "nd", "  model.d_model: 32\n", 1, 0, 300, q, "done");
    write_run_at(&dir, "ns", "  model.d_model: 32\n", 8, 0, 300, q, "done");
    for id in ["dense", "sw", "moe", "plus", "nd", "ns"] {
        set_model(
            &dir,
            id,
            "d_model",
            if id.starts_with('n') {
                "32"
            } else if id == "plus" {
                "80"
            } else {
                "64"
            },
        );
    }
    for id in ["sw", "moe", "plus"] {
        set_model(&dir, id, "capacity_factor", "1.0");
    }
    set_model(&dir, "moe", "top_k", "2");
    report(&dir, &ReportOptions { threshold: None, at_step: None }).unwrap();
    let md = std::fs::read_to_string(dir.join("report/report.md")).unwrap();
    let paper = md.split("The paper's Table 1").nth(1).unwrap();
    let row = |start: &str| paper.lines().find(|l| l.starts_with(start)).unwrap_or_else(|| panic!("{start}: {paper}"));
    assert!(row("| Switch-Base+ | 1.0 |").ends_with("| Switch-8, cf 1 [capacity_factor=1.0 d_model=80] |"), "{paper}");
    assert!(row("| Switch-Base | 1.0 |").ends_with("| Switch-8, cf 1 [capacity_factor=1.0] |"), "{paper}");
    assert!(row("| MoE-Base | 1.0 |").ends_with("| MoE-8 (top-2), cf 1 [top_k=2 capacity_factor=1.0] |"), "{paper}");
    // The narrow Switch is as wide as its own dense: Switch-Base at its capacity factor, not Switch+.
    assert!(row("| Switch-Base | 1.25 |").ends_with("| Switch-8, cf 1.25 [d_model=32] |"), "{paper}");
    assert!(row("| T5-Base | – |").ends_with("| Dense; Dense [d_model=32] |"), "{paper}");
}

/// The y tick labels of a figure's SVG (formatted with two decimals; x labels have none).
fn y_labels(svg_path: &Path) -> Vec<f64> {
    let svg = std::fs::read_to_string(svg_path).unwrap();
    let is_label = |l: &&str| l.len() > 3 && l.as_bytes()[l.len() - 3] == b'.';
    svg.lines().map(str::trim).filter(is_label).filter_map(|l| l.parse().ok()).collect()
}

#[test]
fn quality_vs_time_is_framed_after_the_first_evaluation_and_kept_in_full() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("synthetic");
    // First evaluation at −9, the rest between −2.8 and −2.5.
    write_run(&dir, "d0", 1, 0, 500, |s| if s <= 100.0 { -9.0 } else { -3.0 + s / 1000.0 }, "done");
    report(&dir, &ReportOptions { threshold: None, at_step: None }).unwrap();
    for stem in ["quality_vs_step", "quality_vs_time"] {
        let framed = y_labels(&dir.join(format!("report/{stem}.svg")));
        let full = y_labels(&dir.join(format!("report/{stem}_full.svg")));
        assert!(framed.iter().all(|&y| y > -3.0) && !framed.is_empty(), "{stem}: {framed:?}");
        assert!(full.iter().any(|&y| y < -8.0), "{stem}_full: {full:?}");
    }
    let md = std::fs::read_to_string(dir.join("report/report.md")).unwrap();
    assert!(md.contains("(quality_vs_time_full.png)"), "{md}");
}

/// Switch starts behind dense and overtakes it: the gain table reads the paired difference off
/// the evaluations along the way, at six steps spread over the run.
#[test]
fn the_gain_as_training_goes_is_paired_at_each_evaluation() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tokens");
    for (seed, noise) in [0.0, 0.5].into_iter().enumerate() {
        let seed = seed as u64;
        write_run(&dir, &format!("d{seed}"), 1, seed, 1200, move |s| -3.0 + s / 1000.0 + noise, "done");
        // Switch − dense = (s − 600) / 6000: −0.083 at step 100, 0 at 600, +0.1 at 1200; seed 1 adds 0.01.
        let extra = seed as f64 * 0.01;
        write_run(
            &dir,
            &format!("s{seed}"),
            8,
            seed,
            1200,
            move |s| -3.0 + s / 1000.0 + noise + (s - 600.0) / 6000.0 + extra,
            "done",
        );
    }
    // Seed 2's Switch run stopped at step 600: it counts at steps up to 600, not in the final pairing.
    write_run(&dir, "d2", 1, 2, 1200, |s| -3.0 + s / 1000.0, "done");
    write_run(&dir, "s2", 8, 2, 600, |s| -3.0 + s / 1000.0 + (s - 600.0) / 6000.0 + 0.02, "running");
    let md = report_md(&dir);
    let table = md.split("## Gain as training goes").nth(1).expect("gain table").to_string();
    let head = table.lines().find(|l| l.starts_with("| Model |")).unwrap();
    assert_eq!(head, "| Model | Seeds | step 200 | step 400 | step 600 | step 800 | step 1000 | step 1200 |");
    let row = table.lines().find(|l| l.starts_with("| Switch-8")).unwrap();
    // mean of (d, d + 0.01), std 0.007: the seed noise of 0.5 cancels; up to step 600 with
    // seed 2's d + 0.02 too (std 0.010)
    assert!(row.ends_with("| 2 | -0.057 ± 0.010 | -0.023 ± 0.010 | +0.010 ± 0.010 | +0.038 ± 0.007 | +0.072 ± 0.007 | +0.105 ± 0.007 |"), "{row}");
}

#[test]
fn an_option_left_unset_in_a_zipped_point_is_no_setting() {
    // As experiments/capacity-paper.yaml: `model.router_init_scale: [null, 10.0, …]`.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("zip");
    for seed in 0..2 {
        let j = if seed == 0 { -0.01 } else { 0.01 };
        let unset = "  model.router_init_scale: null\n";
        write_run_at(&dir, &format!("d{seed}"), unset, 1, seed, 500, move |s| -2.5 + s / 1000.0 + j, "done");
        let set = "  model.router_init_scale: 10.0\n";
        write_run_at(&dir, &format!("s{seed}"), set, 8, seed, 500, move |s| -2.4 + s / 1000.0 + j, "done");
    }
    let md = report_md(&dir);
    assert!(!md.contains("null"), "{md}");
    assert!(md.contains("| Dense | 1 |"), "{md}");
    assert!(md.contains("| Switch-8, cf 1.25 [router_init_scale=10.0] | 8 |"), "{md}");
    assert!(md.contains("+0.100 ± 0.000"), "the paired gain over the unlabelled dense: {md}");
}

#[test]
fn the_header_names_the_objective_each_run_trained_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("objective");
    write_run(&dir, "span", 1, 0, 300, |s| -3.0 + s / 1000.0, "done");
    write_run_at(&dir, "prefix", "  data.objective: prefix_lm\n", 1, 0, 300, |s| -2.9 + s / 1000.0, "done");
    let md = report_md(&dir);
    let header = md.lines().find(|l| l.starts_with("Neg log perplexity")).unwrap();
    assert!(
        header.contains("of T5-style span corruption and a prefix LM (NOT the paper's span corruption) on"),
        "{header}"
    );
    std::fs::remove_dir_all(dir.join("runs/span")).unwrap();
    let md = report_md(&dir);
    assert!(!md.contains("T5-style span corruption"), "{md}");
    std::fs::remove_dir_all(dir.join("runs/prefix")).unwrap();
    write_run_at(&dir, "causal", "  data.objective: causal_lm\n", 1, 0, 300, |s| -2.8 + s / 1000.0, "done");
    let md = report_md(&dir);
    assert!(md.contains("of a decoder-only causal LM (NOT the paper's objective or model) on"), "{md}");
}

#[test]
fn a_router_only_setting_is_measured_against_the_ceiling_without_it() {
    // As experiments/ceiling-prefix.yaml: dense, dense 8× wider, Switch-8 with and without
    // `router_init_scale`, two seeds.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ceiling-router");
    for seed in 0..2u64 {
        let n = if seed == 0 { 0.1 } else { -0.1 };
        let arm = |id: &str, setting: &str, experts: u64, d_ff: u64, end: f64| {
            let id = format!("{id}{seed}");
            write_run_at(&dir, &id, setting, experts, seed, 200, move |s| end + n + (s - 200.0) / 1000.0, "done");
            set_model(&dir, &id, "d_ff", &d_ff.to_string());
        };
        arm("d", "", 1, 4, -2.0);
        arm("w", "  model.d_ff: 32\n", 1, 32, -1.6); // ceiling +0.4
        arm("p", "", 8, 4, -2.1); // the paper's router init: −0.1
        arm("c", "  model.router_init_scale: 10.0\n", 8, 4, -1.7); // confident routers: +0.3
    }
    let md = report_md(&dir);
    let ceiling = md.split("## How much of the width ceiling do experts recover").nth(1).expect("ceiling").to_string();
    let rows: Vec<&str> = ceiling.lines().filter(|l| l.starts_with("| preset")).collect();
    assert_eq!(rows.len(), 2, "{ceiling}");
    assert!(
        rows[0].starts_with("| preset | 8 | 2 |") && rows[0].ends_with("| -0.100 ± 0.000 | -0.25 ± 0.00 |"),
        "{ceiling}"
    );
    assert!(rows[1].starts_with("| preset, Switch with router_init_scale=10.0 | 8 | 2 |"), "{ceiling}");
    assert!(
        rows[1].contains("| +0.400 ± 0.000 |") && rows[1].ends_with("| +0.300 ± 0.000 | +0.75 ± 0.00 |"),
        "{ceiling}"
    );
}

/// Three paired seeds of dense and Switch-2, -4 and -8, done after 1000 steps: dense
/// −3 + s/1000 + seed·0.01; Switch-E gains 0.1·log₂E + seed·`seed_gain` (test = final − 0.02 for
/// every run, so paired test gains equal the final ones).
fn write_paired_runs(dir: &Path, seed_gain: f64) {
    for seed in 0..3u64 {
        let noise = seed as f64 * 0.01;
        write_run(dir, &format!("d{seed}"), 1, seed, 1000, move |s| -3.0 + s / 1000.0 + noise, "done");
        for e in [2u64, 4, 8] {
            let gain = 0.1 * (e as f64).log2() + seed as f64 * seed_gain;
            let nlp = move |s: f64| -3.0 + s / 1000.0 + noise + gain * s / 1000.0;
            write_run(dir, &format!("s{e}x{seed}"), e, seed, 1000, nlp, "done");
        }
    }
}

#[test]
fn a_report_of_a_grid_with_claims_prints_each_verdict() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("claims");
    write_paired_runs(&dir, 0.001);
    let claims = r#"
claims:
  - says: more experts, better
    improves_with: {key: model.num_experts, among: {}}
  - says: Switch-8 beats dense
    beats: {point: {model.num_experts: 8}}
  - says: dense beats Switch-2
    beats: {point: {model.num_experts: 1}, over: {model.num_experts: 2}}
  - says: Switch-4 is 10x faster in steps
    step_speedup: {point: {model.num_experts: 4}, at_least: 10}
  - says: Switch-4 sooner than Switch-2
    sooner: {point: {model.num_experts: 4}, than: {model.num_experts: 2}}
  - says: Switch-64 beats dense
    beats: {point: {model.num_experts: 64}}
"#;
    std::fs::write(dir.join("grid.yaml"), format!("name: claims\n{claims}")).unwrap();
    let md = report_md(&dir);
    let table = md.split("## Claims").nth(1).unwrap().split("\n## ").next().unwrap();
    let verdict = |says: &str| {
        let row = table.lines().find(|l| l.starts_with(&format!("| {says} |"))).unwrap_or_else(|| panic!("{table}"));
        row.split(" | ").nth(1).unwrap().to_string()
    };
    assert_eq!(verdict("more experts, better"), "**holds**", "{table}");
    assert_eq!(verdict("Switch-8 beats dense"), "**holds**", "{table}");
    assert_eq!(verdict("dense beats Switch-2"), "**fails**", "{table}");
    // Switch-4 at +0.2: reaches dense's −2.0 at step 1000/1.2 = 833: 1.2×, not 10×.
    assert_eq!(verdict("Switch-4 is 10x faster in steps"), "**fails**", "{table}");
    assert!(table.contains("1.20× sooner"), "{table}");
    assert_eq!(verdict("Switch-4 sooner than Switch-2"), "**holds**", "{table}");
    assert_eq!(verdict("Switch-64 beats dense"), "not measured", "{table}");
    // Switch-8's paired gain: 0.3 + seed·0.001 → +0.301 ± 0.001.
    assert!(table.contains("paired gain +0.301 ± 0.001 over 3 seeds"), "{table}");
}

/// Multiplies the `cpu_s` column of a run's `metrics.csv` by `factor` (a slower or faster
/// machine for that run alone).
fn scale_cpu(dir: &Path, id: &str, factor: f64) {
    let path = dir.join("runs").join(id).join("metrics.csv");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let col = header.split(',').position(|c| c == "cpu_s").unwrap();
    let rows = lines.map(|l| {
        let mut cells: Vec<String> = l.split(',').map(String::from).collect();
        cells[col] = (cells[col].parse::<f64>().unwrap() * factor).to_string();
        cells.join(",")
    });
    std::fs::write(&path, std::iter::once(header.to_string()).chain(rows).collect::<Vec<_>>().join("\n") + "\n")
        .unwrap();
}

#[test]
fn a_time_claim_with_a_margin_asks_the_saving_to_beat_the_timing_noise_between_seeds() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("timing");
    // Dense ends at −1.99 (seed mean), the threshold. Switch-4 reaches it at step ≈ 833, Switch-2
    // and Switch-8 at ≈ 909 and ≈ 769; CPU seconds are step ÷ 20.
    write_paired_runs(&dir, 0.0);
    // Switch-4's runs on machines 30% slower and 20% faster than the others' for two of its seeds:
    // it still wins on the seeds' mean (43.1 against 45.5 CPU s), but not seed by seed.
    scale_cpu(&dir, "s4x1", 1.3);
    scale_cpu(&dir, "s4x2", 0.8);
    // Switch-8 saves about 7 CPU s on every seed, one of its runs on a machine 2% slower.
    scale_cpu(&dir, "s8x1", 1.02);
    // Switch-16 worse than dense: it never reaches the threshold, so no margin can be measured.
    for seed in 0..3u64 {
        let noise = seed as f64 * 0.01;
        write_run(&dir, &format!("s16x{seed}"), 16, seed, 1000, move |s| -3.0 + 0.9 * s / 1000.0 + noise, "done");
    }
    let claims = r#"
claims:
  - says: Switch-4 sooner than Switch-2
    sooner: {point: {model.num_experts: 4}, than: {model.num_experts: 2}}
  - says: Switch-4 sooner than Switch-2 beyond the noise
    sooner: {point: {model.num_experts: 4}, than: {model.num_experts: 2}, by_paired_std: 2}
  - says: Switch-8 sooner than Switch-2 beyond the noise
    sooner: {point: {model.num_experts: 8}, than: {model.num_experts: 2}, by_paired_std: 2}
  - says: Switch-2 sooner than Switch-4 beyond the noise
    sooner: {point: {model.num_experts: 2}, than: {model.num_experts: 4}, by_paired_std: 2}
  - says: Switch-8 sooner than Switch-16 beyond the noise
    sooner: {point: {model.num_experts: 8}, than: {model.num_experts: 16}, by_paired_std: 2}
"#;
    std::fs::write(dir.join("grid.yaml"), format!("name: timing\n{claims}")).unwrap();
    let md = report_md(&dir);
    let table = md.split("## Claims").nth(1).unwrap().split("\n## ").next().unwrap();
    let row =
        |says: &str| table.lines().find(|l| l.starts_with(&format!("| {says} |"))).unwrap_or_else(|| panic!("{table}"));
    let plain = row("Switch-4 sooner than Switch-2");
    assert!(
        plain.contains("**holds**") && !plain.contains("paired"),
        "the claim without a margin reads as before: {plain}"
    );
    let noisy = row("Switch-4 sooner than Switch-2 beyond the noise");
    assert!(noisy.contains("**fails**") && noisy.contains("over 3 seeds") && noisy.contains("(needs > 2)"), "{table}");
    // Seed by seed: (909 − 833) ÷ 20 ≈ +3.8, 45.5 − 1.3 × 41.7 ≈ −8.7 and 45.5 − 0.8 × 41.7 ≈ +12.2.
    assert!(noisy.contains("paired saving +2.4 ± 10.5 CPU s"), "{noisy}");
    let clean = row("Switch-8 sooner than Switch-2 beyond the noise");
    assert!(clean.contains("**holds**") && clean.contains("paired saving +6."), "{clean}");
    assert!(!clean.contains("inf std"), "a finite margin: {clean}");
    // Slower on the seeds' mean: it fails without a margin to weigh.
    let slower = row("Switch-2 sooner than Switch-4 beyond the noise");
    assert!(slower.contains("**fails**") && !slower.contains("paired"), "{slower}");
    let unmeasured = row("Switch-8 sooner than Switch-16 beyond the noise");
    assert!(
        unmeasured.contains("**holds**") && unmeasured.contains("never reaches it: no margin to measure"),
        "{unmeasured}"
    );
}

#[test]
fn a_sweep_with_a_diverged_run_reports_in_bounded_time_and_marks_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nan");
    write_run(&dir, "dense", 1, 0, 500, |s| -3.0 + s / 1000.0, "done");
    write_run(&dir, "nan", 4, 0, 500, |s| if s > 250.0 { f64::NAN } else { -3.0 + s / 900.0 }, "failed");
    write_run(&dir, "inf", 8, 0, 500, |s| if s > 350.0 { f64::NEG_INFINITY } else { -3.0 + s / 800.0 }, "failed");
    let (tx, rx) = std::sync::mpsc::channel();
    let d = dir.clone();
    std::thread::spawn(move || tx.send(report(&d, &ReportOptions { threshold: None, at_step: None }).map(|_| ())));
    let done = rx.recv_timeout(std::time::Duration::from_secs(60)).expect("report finishes within a minute");
    done.unwrap();
    let md = std::fs::read_to_string(dir.join("report/report.md")).unwrap();
    assert!(md.contains("**Diverged**") && md.contains("nan (step 300)") && md.contains("inf (step 400)"), "{md}");
    assert!(md.lines().any(|l| l.starts_with("| nan |") && l.contains("diverged at step 300")), "{md}");
    let csv = std::fs::read_to_string(dir.join("report/summary.csv")).unwrap();
    assert!(csv.lines().any(|l| l.starts_with("nan,") && l.ends_with(",300")), "{csv}");
    let tables = md.lines().filter(|l| l.starts_with('|'));
    assert!(
        tables.clone().all(|l| !l.contains("NaN") && !l.contains("-inf")),
        "no non-finite number reaches a table: {md}"
    );
}

/// `len` bytes that are neither UTF-8 nor YAML, the same every time (a xorshift generator).
fn random_bytes(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    out[0] = 0xff; // never a UTF-8 byte, whatever the generator gives
    out
}

/// A `status.json` cut off mid-write: the run's row says which file is damaged and what the next
/// sweep does about it, instead of a bare `unknown` state.
#[test]
fn a_damaged_status_is_named_in_its_runs_row() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("damaged");
    let q = |s: f64| -3.0 + s / 1000.0;
    write_run(&dir, "d", 1, 0, 300, q, "done");
    write_run(&dir, "s", 2, 0, 300, q, "done");
    let status = dir.join("runs/s/status.json");
    std::fs::write(&status, &std::fs::read(&status).unwrap()[..20]).unwrap();
    let md = report_md(&dir);
    // The runs table's row (the routing tables have rows of `s` too).
    let row =
        md.lines().find(|l| l.starts_with("| s |") && l.contains("| unknown |")).unwrap_or_else(|| panic!("{md}"));
    assert!(row.contains("status.json: damaged"), "{row}");
    // Synthetic runs have no checkpoint: the next sweep would keep the logs and fail the run.
    assert!(row.contains("no checkpoint to resume from"), "{row}");
    assert!(md.lines().filter(|l| l.starts_with("| d |")).all(|l| !l.contains("damaged")), "{md}");
}

/// A done run whose metrics.csv lost its last rows after the run finished: its row says so, and
/// the gain table marks the comparison unfinished instead of passing step 200 off as the end.
#[test]
fn a_done_run_whose_log_was_cut_short_is_marked_unfinished() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cut");
    let q = |s: f64| -3.0 + s / 1000.0;
    write_run_at(&dir, "d", "  model.expert_every: 2\n", 1, 0, 300, q, "done");
    write_run_at(&dir, "s", "  model.expert_every: 2\n", 2, 0, 300, q, "done");
    let gain_row = |md: &str| md.lines().find(|l| l.starts_with("| expert_every=2")).map(str::to_string);
    assert!(gain_row(&report_md(&dir)).is_some_and(|l| !l.contains("unfinished")));
    let metrics = dir.join("runs/s/metrics.csv");
    let kept: Vec<String> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .filter(|l| l.split(',').next().unwrap().parse::<f64>().map_or(true, |step| step <= 200.0))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&metrics, kept.concat()).unwrap();
    let md = report_md(&dir);
    let row = md.lines().find(|l| l.starts_with("| s |") && l.contains("| done |")).unwrap_or_else(|| panic!("{md}"));
    assert!(row.contains("no usable evaluation at its last step (300)") && row.contains("use step 200's"), "{row}");
    assert!(gain_row(&md).is_some_and(|l| l.contains("(unfinished: last evaluation)")), "{md}");
}

/// A metrics.csv edited by hand or damaged on disk: an evaluation no run can write (a positive
/// neg log perplexity, 1e308) is left out of the curve and named, and so is a cell that is not a
/// number, instead of the one stretching the figures' axes and the other vanishing silently.
#[test]
fn impossible_or_unreadable_log_values_are_named_and_left_out() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("edited");
    let q = |s: f64| -3.0 + s / 1000.0;
    write_run(&dir, "d", 1, 0, 300, q, "done");
    write_run(&dir, "s", 2, 0, 300, q, "done");
    let metrics = dir.join("runs/s/metrics.csv");
    let text = std::fs::read_to_string(&metrics).unwrap();
    let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
    let column = |name: &str| header.iter().position(|c| *c == name).unwrap();
    let edited: Vec<String> = text
        .lines()
        .map(|l| {
            let mut cells: Vec<String> = l.split(',').map(String::from).collect();
            match cells[0].as_str() {
                "100" => cells[column("eval_neg_log_perplexity")] = "1e308".into(),
                "200" => cells[column("train_loss")] = "abc".into(),
                _ => {}
            }
            cells.join(",") + "\n"
        })
        .collect();
    std::fs::write(&metrics, edited.concat()).unwrap();
    let runs = runs::load(&dir).unwrap();
    let s = runs.iter().find(|r| r.id == "s").unwrap();
    assert_eq!(s.curve.iter().map(|p| p.step).collect::<Vec<_>>(), [200.0, 300.0]);
    let problem = s.problem.as_deref().unwrap_or_default();
    assert!(problem.contains("step 100 reads eval_neg_log_perplexity 1e308, impossible"), "{problem}");
    assert!(problem.contains("1 row(s) with a value that is not a number"), "{problem}");
    assert!(runs.iter().find(|r| r.id == "d").unwrap().problem.is_none());
}

#[test]
fn a_run_whose_config_is_garbage_is_listed_with_its_problem_and_compared_with_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("garbage");
    // A width-ceiling grid (dense, dense 2× wider, Switch-2), and one run whose config.yaml
    // is random bytes: without a width of its own it must not become a dense model of width 0.
    let q = |s: f64| -3.0 + s / 1000.0;
    for (id, setting, experts, d_ff) in [("d", "", 1, 4), ("w", "  model.d_ff: 8\n", 1, 8), ("s", "", 2, 4)] {
        write_run_at(&dir, id, setting, experts, 0, 300, q, "done");
        set_model(&dir, id, "d_ff", &d_ff.to_string());
    }
    write_run(&dir, "bad", 1, 0, 300, q, "done");
    std::fs::write(dir.join("runs/bad/config.yaml"), random_bytes(4096)).unwrap();

    let md = report_md(&dir);
    let row = md.lines().find(|l| l.starts_with("| bad |")).unwrap_or_else(|| panic!("{md}"));
    assert!(row.contains("config.yaml"), "{row}");
    // Left out of comparisons: Table 1 has the two good dense models only, and the width
    // ceiling is the good pair's.
    let table1 = md.split("## Switch vs MoE vs dense").nth(1).unwrap().split("\n## ").next().unwrap();
    assert_eq!(table1.lines().filter(|l| l.starts_with("| Dense |")).count(), 2, "{table1}");
    let ceiling = md.split("## How much of the width ceiling").nth(1).expect("ceiling").split("\n## ").next().unwrap();
    assert_eq!(ceiling.lines().filter(|l| l.starts_with("| preset |")).count(), 1, "{ceiling}");
    let csv = std::fs::read_to_string(dir.join("report/summary.csv")).unwrap();
    assert!(csv.lines().any(|l| l.starts_with("bad,")), "{csv}");

    // A sweep of nothing but such runs still reports, and says why there is nothing to compare.
    for id in ["d", "w", "s"] {
        std::fs::remove_dir_all(dir.join("runs").join(id)).unwrap();
    }
    let md = report_md(&dir);
    assert!(md.lines().any(|l| l.starts_with("| bad |") && l.contains("config.yaml")), "{md}");
}

#[test]
fn a_routing_log_that_is_not_utf8_marks_its_own_run_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("bad-routing");
    write_run(&dir, "dense", 1, 0, 300, |s| -3.0 + s / 1000.0, "done");
    for seed in 0..2 {
        write_run(&dir, &format!("sw{seed}"), 4, seed, 300, |s| -3.0 + 2.0 * s / 1000.0, "done");
    }
    // sw1's routing log has a row whose layer name is not UTF-8.
    let path = dir.join("runs/sw1/routing.csv");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(b"300,\xff\xfe\x80,0,0.25,0.01,0.5\n");
    std::fs::write(&path, bytes).unwrap();

    let runs = runs::load(&dir).unwrap();
    let run = |id: &str| runs.iter().find(|r| r.id == id).unwrap();
    let problem = run("sw1").problem.clone().unwrap_or_default();
    assert!(problem.contains("routing.csv"), "{problem}");
    assert!(run("sw1").routing.is_empty());
    // Its metrics are fine: its curve still counts. The other runs are untouched.
    assert_eq!(run("sw1").curve.len(), 3);
    assert_eq!(run("sw0").problem, None);
    assert!(!run("sw0").routing.is_empty());

    let md = report_md(&dir);
    let row = md.lines().find(|l| l.starts_with("| sw1 |") && l.contains("| done |")).unwrap_or_else(|| panic!("{md}"));
    assert!(row.contains("routing.csv"), "{row}");
    assert!(md.contains("| sw0 | Switch-4 | encoder.1 | 1.00 | 1.00 | 0 |"), "{md}");
    assert!(dir.join("report/summary.csv").exists());
}

#[test]
fn report_options_out_of_range_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("options");
    write_run(&dir, "dense", 1, 0, 300, |s| -3.0 + s / 1000.0, "done");
    let cases = [
        (None, Some(-5.0), "--at-step"),
        (None, Some(2.5), "--at-step"),
        (None, Some(f64::INFINITY), "--at-step"),
        (None, Some(f64::NAN), "--at-step"),
        (Some(f64::NAN), None, "--threshold"),
        (Some(f64::INFINITY), None, "--threshold"),
        (Some(f64::NEG_INFINITY), None, "--threshold"),
    ];
    for (threshold, at_step, flag) in cases {
        let err = report(&dir, &ReportOptions { threshold, at_step }).expect_err(flag).to_string();
        assert!(err.contains(flag), "{threshold:?} {at_step:?}: {err}");
        assert!(!dir.join("report").exists(), "{threshold:?} {at_step:?}: report/ was created");
    }
    // In range: accepted.
    for (threshold, at_step) in [(Some(-2.5), Some(0.0)), (Some(-2.5), Some(200.0))] {
        assert!(ReportOptions { threshold, at_step }.validate().is_ok());
    }
}

#[test]
fn a_dense_model_of_unknown_width_measures_no_ceiling() {
    // A config without `model.d_ff` (width 0) beside a dense model that sets it: no ceiling is
    // measured from width 0 (it was a division by zero), the rest of the report is written.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("no-width");
    write_run(&dir, "d", 1, 0, 300, |s| -3.0 + s / 1000.0, "done");
    write_run_at(&dir, "w", "  model.d_ff: 8\n", 1, 0, 300, |s| -2.9 + s / 1000.0, "done");
    set_model(&dir, "w", "d_ff", "8");
    let md = report_md(&dir);
    assert!(!md.contains("## How much of the width ceiling"), "{md}");
    assert!(md.lines().any(|l| l.starts_with("| w |")), "{md}");
}

#[test]
fn the_report_says_which_kernels_trained_its_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("kernels");
    write_run_at(&dir, "d0", "train.kernels: fused_slots", 1, 0, 100, |s| -3.0 + s / 1000.0, "done");
    write_run_at(&dir, "s0", "train.kernels: fused_slots", 8, 0, 100, |s| -3.0 + s / 500.0, "done");
    write_run_at(&dir, "s1", "train.kernels: fused", 8, 1, 100, |s| -3.0 + s / 500.0, "done");
    let md = report_md(&dir);
    assert!(md.contains("**Engine:** kernels `fused_slots` in 2 run(s), `fused` in 1 run(s)"), "{md}");
    std::fs::remove_dir_all(dir.join("runs/s1")).unwrap();
    let md = report_md(&dir);
    assert!(md.contains("**Engine:** kernels `fused_slots` in every run"), "{md}");
}

/// Three runs of one point and seed: the latest start wins, a tie goes to the larger id, and
/// every other run names that one (not merely a newer one).
#[test]
fn the_latest_run_of_a_point_and_seed_supersedes_all_others_ties_by_id() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("reruns");
    write_run(&dir, "d0", 1, 0, 100, |s| -3.0 + s / 1000.0, "done");
    for (id, started) in [("a8", 10.0), ("c8", 30.0), ("b8", 30.0), ("e8", 20.0)] {
        write_run(&dir, id, 8, 0, 100, |s| -3.0 + s / 500.0, "done");
        let path = dir.join("runs").join(id).join("status.json");
        let mut status: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        status["started_at"] = started.into();
        std::fs::write(&path, status.to_string()).unwrap();
    }
    let runs = runs::load(&dir).unwrap();
    let by = |id: &str| runs.iter().find(|r| r.id == id).unwrap().superseded_by.clone();
    assert_eq!(
        [by("a8"), by("b8"), by("c8"), by("e8"), by("d0")],
        [Some("c8".into()), Some("c8".into()), None, Some("c8".into()), None]
    );
}

/// A sweep re-run into a folder that holds a run of the same point and seed from earlier code
/// (another run id) counts that seed once: the later run's.
#[test]
fn a_run_superseded_by_a_later_one_of_its_point_and_seed_is_left_out() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("rerun");
    write_run(&dir, "d0", 1, 0, 100, |s| -3.0 + s / 1000.0, "done");
    write_run(&dir, "old8", 8, 0, 100, |s| -3.0 + s / 200.0, "done");
    write_run(&dir, "new8", 8, 0, 100, |s| -3.0 + s / 500.0, "done");
    for (id, started) in [("d0", 10.0), ("old8", 20.0), ("new8", 30.0)] {
        let path = dir.join("runs").join(id).join("status.json");
        let mut status: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        status["started_at"] = started.into();
        std::fs::write(&path, status.to_string()).unwrap();
    }
    let runs = runs::load(&dir).unwrap();
    let old = runs.iter().find(|r| r.id == "old8").unwrap();
    assert_eq!(old.superseded_by.as_deref(), Some("new8"));
    assert!(runs.iter().find(|r| r.id == "new8").unwrap().superseded_by.is_none());
    let md = report_md(&dir);
    assert!(md.contains("**Superseded**") && md.contains("old8 (by new8)"), "{md}");
    // Switch-8 is new8 alone: −3 + 100/500 = −2.8 (old8 would give −2.5, or a mean of two).
    let row = md.lines().find(|l| l.starts_with("| Switch-8")).unwrap();
    assert!(row.contains("| -2.800 |"), "{row}");
    let csv = std::fs::read_to_string(dir.join("report/summary.csv")).unwrap();
    assert!(!csv.contains("old8,") && csv.contains("new8,"), "{csv}");
}
