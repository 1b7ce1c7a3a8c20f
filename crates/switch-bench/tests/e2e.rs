//! Through the `switch-bench` binary: its commands, the quick `report` figure, a child's line of
//! JSON, and the PyTorch comparison's advice when torch is missing.
use std::path::{Path, PathBuf};
use std::process::Command;

fn switch_bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_switch-bench"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "must fail: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The eight benchmarks, and not the children they re-run the binary as.
#[test]
fn help_lists_the_eight_benchmarks() {
    let help = run_ok(switch_bench().arg("--help"));
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        commands,
        ["sweep", "data", "report", "engine", "optimizer", "slots", "products", "pytorch", "help"],
        "{help}"
    );
    assert!(
        run_ok(switch_bench().args(["engine-run", "--help"])).contains("--experts"),
        "the children are hidden, not gone"
    );
}

#[test]
fn slots_compares_the_two_modes_on_every_shape_and_refuses_a_bad_fraction() {
    let out = run_ok(switch_bench().args(["slots", "--rounds", "1", "--in-use", "0.5"]));
    let rows: Vec<&str> = out.lines().filter(|l| l.contains("fused_router") && l.contains("×")).collect();
    assert_eq!(rows.len(), 6, "{out}");
    assert!(out.contains("with 50% of each expert's slots in use"), "{out}");
    let err = run_err(switch_bench().args(["slots", "--in-use", "1.5"]));
    assert!(err.contains("--in-use 1.5"), "{err}");
}

#[test]
fn products_prints_warm_and_cold_rates_for_both_presets_and_refuses_no_rounds() {
    let out = run_ok(switch_bench().current_dir(repo()).args(["products", "--rounds", "1", "--evict-mib", "8"]));
    let rows: Vec<&str> = out.lines().filter(|l| l.contains(" warm ") && l.contains(" cold ")).collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(rows[0].starts_with("shape  2 thr, 2048 tokens × d_model 256, d_ff 1024"), "{out}");
    assert!(rows[1].starts_with("tiny   1 thr"), "{out}");
    let err = run_err(switch_bench().args(["products", "--rounds", "0"]));
    assert!(err.contains("--rounds 0"), "{err}");
}

#[test]
fn report_prints_its_time() {
    let out = run_ok(switch_bench().arg("report"));
    let secs = out.trim().strip_prefix("report on 6 runs × 2,000 logged steps: ").and_then(|s| s.strip_suffix(" s"));
    assert!(secs.is_some_and(|s| s.parse::<f64>().is_ok_and(|s| s > 0.0)), "{out}");
}

/// A child of `engine` prints one line of JSON, its whole report, and nothing else on stdout.
#[test]
fn engine_pairs_child_reports_in_json() {
    let tmp = tempfile::tempdir().unwrap(); // its dataset cache goes in results/ under here
    let out = run_ok(
        switch_bench()
            .current_dir(tmp.path())
            .args(["engine-pairs", "--experts", "2", "--threads", "1", "--pairs", "2", "--cache", "on"])
            .env("RAYON_NUM_THREADS", "1"),
    );
    assert_eq!(out.lines().count(), 1, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ratios = report["ratios"].as_array().unwrap_or_else(|| panic!("{out}"));
    assert_eq!(ratios.len(), 2, "{out}");
    assert!(ratios.iter().all(|r| r.as_f64().is_some_and(|r| r > 0.0)), "{out}");
}

#[test]
fn bench_pytorch_without_torch_says_how_to_install_it() {
    let root = repo();
    let python = root.join("no-such-python");
    for command in ["pytorch", "engine"] {
        // `engine` given a Python that cannot import torch refuses before it measures anything.
        let err = run_err(switch_bench().current_dir(&root).args([command, "--python"]).arg(&python));
        assert!(err.contains("no-such-python") && err.contains("pip install torch transformers"), "{command}: {err}");
    }
}

/// `optimizer` times each pass over the parameters and reports it as GB/s.
#[test]
fn optimizer_reports_each_pass() {
    let out = run_ok(switch_bench().args(["optimizer", "--params", "65536", "--rounds", "1"]));
    let passes: Vec<&str> = out.lines().filter(|l| l.contains(" ms ") && l.contains("GB/s")).collect();
    assert_eq!(passes.len(), 4, "{out}");
    assert!(passes.iter().any(|l| l.starts_with("AdamW, bf16 moments")), "{out}");
}
