//! The README's promises, checked: its grid example plans as written, and every `±` figure and
//! speedup it quotes appears in a committed report (so none can drift from the runs).
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn readme() -> String {
    std::fs::read_to_string(repo().join("README.md")).unwrap()
}

#[test]
fn the_readme_grid_example_plans_as_written() {
    let text = readme();
    let start = text.find("```yaml\n").expect("a yaml block") + "```yaml\n".len();
    let block = &text[start..start + text[start..].find("```").unwrap()];
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("presets")).unwrap();
    std::fs::copy(repo().join("experiments/presets/tiny.yaml"), tmp.path().join("presets/tiny.yaml")).unwrap();
    let grid = tmp.path().join("example.yaml");
    std::fs::write(&grid, block).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_switchlab")).arg("plan").arg(&grid).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // dense ×1 + Switch 2, 4, 8 × 2 capacity factors + the extra point, each × 3 seeds
    assert_eq!(stdout.lines().count(), 1 + 24, "a header and 24 runs: {stdout}");
}

/// `+0.188 ± 0.023`-style figures and `1.39×`-style ratios in `text`.
fn quoted_figures(text: &str) -> Vec<String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let number = |w: &str| {
        let w = w.trim_start_matches(['(', '+', '−', '-']);
        !w.is_empty() && w.chars().all(|c| c.is_ascii_digit() || c == '.') && w.contains('.')
    };
    let mut out = Vec::new();
    for (i, w) in words.iter().enumerate() {
        if *w == "±" && i > 0 && i + 1 < words.len() && number(words[i - 1]) {
            let sd = words[i + 1].trim_end_matches([',', ')', ';', '.']);
            let mean = words[i - 1].trim_start_matches('(').replace('−', "-");
            out.push(format!("{mean} ± {sd}"));
        }
        if let Some(x) = w.trim_end_matches([',', ')', ';', '.']).strip_suffix('×') {
            if number(x) && x.contains('.') {
                out.push(format!("{x}×"));
            }
        }
    }
    out
}

#[test]
fn every_figure_the_readme_quotes_is_in_a_committed_report() {
    let reports: String = ["results/paper/report/report.md", "results/experts/report/report.md"]
        .iter()
        .map(|p| std::fs::read_to_string(repo().join(p)).unwrap())
        .collect();
    let figures = quoted_figures(&readme());
    assert!(figures.len() >= 8, "the README quotes its results: {figures:?}");
    for f in &figures {
        assert!(reports.contains(f.as_str()), "README quotes `{f}`, which no committed report holds");
    }
    // The checker itself: a figure no report holds is caught.
    assert_eq!(quoted_figures("gain +9.999 ± 0.001, and 7.77× sooner"), ["+9.999 ± 0.001", "7.77×"]);
}
