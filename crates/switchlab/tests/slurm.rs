//! The Slurm backend against a real single-node Slurm (started by `.ci/slurm-setup.sh`), and its
//! input checks, which need no Slurm. The Slurm test is `#[ignore]`d, so a plain `cargo test`
//! lists it as ignored instead of counting a skip as a pass; `.ci/run` runs it with `--ignored`
//! after starting Slurm, and then a missing Slurm fails it.
use std::path::{Path, PathBuf};
use std::process::Command;

fn switchlab() -> Command {
    Command::new(env!("CARGO_BIN_EXE_switchlab"))
}

fn grid(dir: &Path, slurm: &str) -> PathBuf {
    let corpus = switch_data::corpus::write_excerpt(&dir.join("corpus"), 200_000).unwrap();
    let path = dir.join("cluster.yaml");
    std::fs::write(&path, format!(
        "name: cluster\nsettings:\n  model: {{ d_model: 32, d_ff: 64, num_heads: 2, d_kv: 16, num_encoder_layers: 2, num_decoder_layers: 2 }}\n  data: {{ corpus: {}, tokenizer: byte, encoder_len: 32, eval_examples: 16 }}\n  train: {{ steps: 6, batch_size: 4, eval_every: 3, log_every: 1, checkpoint_every: 3, warmup_steps: 2, eval_batch_size: 8 }}\ngrid:\n  model.num_experts: [1, 2, 4, 8]\nbaseline: {{ model.num_experts: 1 }}\n{slurm}",
        corpus.display())).unwrap();
    path
}

/// `switchlab sweep --backend slurm FLAGS --results RESULTS GRID`.
fn slurm_sweep(flags: &[&str], results: &Path, grid: &Path) -> std::process::Output {
    switchlab()
        .args(["sweep", "--backend", "slurm"])
        .args(flags)
        .arg("--results")
        .arg(results)
        .arg(grid)
        .output()
        .unwrap()
}

fn slurm_is_up() -> bool {
    Command::new("sinfo").args(["-h", "-o", "%T"]).output().is_ok_and(|o| o.status.success() && !o.stdout.is_empty())
}

#[test]
#[ignore = "needs a running Slurm: run .ci/slurm-setup.sh as root, then cargo test -p switchlab --test slurm -- --ignored"]
fn a_micro_sweep_runs_as_a_slurm_array_job() {
    assert!(
        slurm_is_up(),
        "no running Slurm here (`sinfo` failed): `bash .ci/slurm-setup.sh` as root installs and starts one"
    );
    let tmp = tempfile::tempdir().unwrap();
    let grid = grid(tmp.path(), "slurm:\n  cpus_per_task: 1\n  time: \"10\"\n  max_concurrent: 2\n");
    let results = tmp.path().join("results");
    let out = slurm_sweep(&["--wait"], &results, &grid);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("submitted array job") && stderr.contains("4 tasks"), "{stderr}");
    let sweep = results.join("cluster");
    let script = std::fs::read_to_string(sweep.join("slurm/sweep.sbatch")).unwrap();
    assert!(script.contains("#SBATCH --array=0-3%2") && script.contains("#SBATCH --cpus-per-task=1"), "{script}");
    let runs: Vec<PathBuf> = std::fs::read_dir(sweep.join("runs")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(runs.len(), 4);
    for run in &runs {
        let s: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("status.json")).unwrap()).unwrap();
        assert_eq!(
            s["state"],
            "done",
            "{}: {}",
            run.display(),
            std::fs::read_to_string(run.join("slurm.log")).unwrap_or_default()
        );
    }
    assert!(sweep.join("report/report.md").exists());
    let status = String::from_utf8_lossy(&switchlab().arg("status").arg(&sweep).output().unwrap().stdout).to_string();
    assert_eq!(status.lines().filter(|l| l.contains(" done ")).count(), 4, "{status}");
    // Resubmitting finds nothing left to do.
    let again = slurm_sweep(&[], &results, &grid);
    assert!(String::from_utf8_lossy(&again.stderr).contains("nothing to submit"));
}

#[test]
fn bad_slurm_settings_are_refused_before_submission() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results");
    for (block, needle) in [
        ("slurm:\n  partiton: gpu\n", "unknown field `partiton`"),
        ("slurm:\n  time: \"-5\"\n", "slurm.time"),
        ("slurm:\n  require_partition: true\n", "slurm.partition: is required"),
        ("slurm:\n  cpus_per_task: -1\n", "cpus_per_task"),
        ("slurm:\n  time: forever\n", "slurm.time: `forever` is not a Slurm time limit"),
        ("slurm:\n  mem: lots\n", "slurm.mem: `lots` is not a Slurm memory size"),
        // Each task trains one run: a run estimated above slurm.mem is refused before submission.
        ("slurm:\n  mem: 1M\n", "more than the 1.00 MiB of slurm.mem = 1M"),
    ] {
        let grid = grid(tmp.path(), block);
        let out = slurm_sweep(&["--dry-run"], &results, &grid);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("cluster.yaml") && err.contains(needle), "{block}: {err}");
        assert!(!results.join("cluster/runs").exists(), "nothing written for {block}");
    }
    // A dry run writes the script and prints the command, submitting nothing.
    let grid = grid(tmp.path(), "slurm:\n  partition: debug\n  time: \"00:10:00\"\n  extra: [\"--account=ml\"]\n");
    let out = slurm_sweep(&["--dry-run"], &results, &grid);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("sbatch --parsable"));
    let script = std::fs::read_to_string(results.join("cluster/slurm/sweep.sbatch")).unwrap();
    assert!(
        script.contains("#SBATCH --partition=debug")
            && script.contains("#SBATCH --account=ml")
            && script.contains(" train \"$CONFIG\"")
    );
    assert!(!results.join("cluster/slurm/jobs.txt").exists());
}

/// Without `sbatch`, a Slurm sweep is refused before any folder, grid.yaml or plan.csv is written.
#[test]
fn without_sbatch_a_slurm_sweep_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results");
    let grid = grid(tmp.path(), "");
    let out = Command::new(env!("CARGO_BIN_EXE_switchlab"))
        .args(["sweep", "--backend", "slurm", "--results"])
        .arg(&results)
        .arg(&grid)
        .env("PATH", tmp.path()) // a PATH with no sbatch on it
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no `sbatch` on PATH") && err.contains("--dry-run"), "{err}");
    assert!(!results.exists(), "nothing written");
}
