//! End to end through the binary: plan → sweep → report on a micro grid, and Ctrl-C → resume.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn switchlab() -> Command {
    Command::new(env!("CARGO_BIN_EXE_switchlab"))
}

/// A 2-point micro grid on real text (the start of each embedded book), byte tokens, a few steps.
fn micro_grid(dir: &Path, steps: u64) -> PathBuf {
    let corpus = switch_data::corpus::write_excerpt(&dir.join("corpus"), 120_000).unwrap();
    let grid = dir.join("micro.yaml");
    std::fs::write(&grid, format!(
        "name: micro\nsettings:\n  model: {{ d_model: 32, d_ff: 64, num_heads: 2, d_kv: 16, num_encoder_layers: 2, num_decoder_layers: 2 }}\n  data: {{ corpus: {}, tokenizer: byte, encoder_len: 32, eval_examples: 16 }}\n  train: {{ steps: {steps}, batch_size: 4, eval_every: 3, log_every: 1, checkpoint_every: 3, warmup_steps: 2, eval_batch_size: 8 }}\ngrid:\n  model.num_experts: [1, 4]\nbaseline: {{ model.num_experts: 1 }}\n",
        corpus.display())).unwrap();
    grid
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn plan_sweep_report() {
    let tmp = tempfile::tempdir().unwrap();
    let grid = micro_grid(tmp.path(), 6);
    let csv = run_ok(switchlab().args(["plan", "--format", "csv"]).arg(&grid));
    assert_eq!(
        csv,
        run_ok(switchlab().args(["plan", "--format", "csv"]).arg(&grid)),
        "run ids are stable across processes"
    );
    let rows: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 3);
    let flops = rows[0].iter().position(|c| *c == "flops_per_token").unwrap();
    assert_eq!(rows[1][flops], rows[2][flops], "dense and Switch at equal FLOPs per token");

    let results = tmp.path().join("results");
    run_ok(switchlab().arg("sweep").arg(&grid).arg("--results").arg(&results).arg("--report").stderr(Stdio::piped()));
    let report = results.join("micro/report");
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    for id in rows[1..].iter().map(|r| r[0]) {
        assert!(md.contains(&format!("| {id} |")), "run {id} in the report:\n{md}");
    }
    assert!(md.contains("| Dense | 1 |") && md.contains("| Switch-4, cf 1.25 | 4 |"), "{md}");
    for f in
        ["quality_vs_step.png", "quality_vs_step.svg", "quality_vs_params.png", "routing_min_load.png", "summary.csv"]
    {
        assert!(report.join(f).exists(), "{f}");
    }
    // A second sweep finds everything done and trains nothing.
    let out = switchlab().arg("sweep").arg(&grid).arg("--results").arg(&results).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("0 trained, 2 already done"));
}

#[test]
fn ctrl_c_checkpoints_and_the_same_command_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let grid = micro_grid(tmp.path(), 400);
    let results = tmp.path().join("results");
    let mut child =
        switchlab().arg("sweep").arg(&grid).arg("--results").arg(&results).stderr(Stdio::piped()).spawn().unwrap();
    // Wait until both runs have logged a few steps, then interrupt.
    let start = Instant::now();
    let logged = |results: &Path| -> usize {
        std::fs::read_dir(results.join("micro/runs"))
            .map(|d| {
                d.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("metrics.csv")).ok())
                    .filter(|m| m.lines().count() > 5)
                    .count()
            })
            .unwrap_or(0)
    };
    while logged(&results) < 2 {
        assert!(start.elapsed() < Duration::from_secs(120), "runs never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(2), "an interrupted sweep exits non-zero");
    for entry in std::fs::read_dir(results.join("micro/runs")).unwrap() {
        let dir = entry.unwrap().path();
        let s: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("status.json")).unwrap()).unwrap();
        assert_eq!(s["state"], "running");
        let done = s["steps_done"].as_u64().unwrap();
        assert!(done > 0 && done < 400, "{done}");
        assert!(dir.join("checkpoint/tensors.bin").exists());
    }
    assert!(!results.join("micro/.lock").exists(), "the lock is released");
    // Running the same command again resumes both runs from their checkpoints and finishes them.
    let out = switchlab().arg("sweep").arg(&grid).arg("--results").arg(&results).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for entry in std::fs::read_dir(results.join("micro/runs")).unwrap() {
        let dir = entry.unwrap().path();
        let s: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("status.json")).unwrap()).unwrap();
        assert_eq!((s["state"].as_str(), s["steps_done"].as_u64()), (Some("done"), Some(400)));
        let metrics = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
        let steps: Vec<u64> = metrics.lines().skip(1).map(|l| l.split(',').next().unwrap().parse().unwrap()).collect();
        assert_eq!(steps, (1..=400).collect::<Vec<_>>(), "one row per step, none repeated or lost");
    }
}
