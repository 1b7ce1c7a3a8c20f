//! End to end through the binary: plan → sweep → report on a micro grid, and Ctrl-C → resume.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn switchlab() -> Command {
    Command::new(env!("CARGO_BIN_EXE_switchlab"))
}

/// A 2-point micro grid on real text (the start of each embedded book), byte tokens, a few steps.
fn micro_grid(dir: &Path, steps: u64) -> PathBuf {
    grid_with(dir, "micro", steps, "[1, 4]", "")
}

/// The micro grid's model and data as grid `name`, over `experts`, with `extra` YAML appended.
fn grid_with(dir: &Path, name: &str, steps: u64, experts: &str, extra: &str) -> PathBuf {
    let corpus = switch_data::corpus::write_excerpt(&dir.join("corpus"), 200_000).unwrap();
    let grid = dir.join(format!("{name}.yaml"));
    std::fs::write(&grid, format!(
        "name: {name}\nsettings:\n  model: {{ d_model: 32, d_ff: 64, num_heads: 2, d_kv: 16, num_encoder_layers: 2, num_decoder_layers: 2 }}\n  data: {{ corpus: {}, tokenizer: byte, encoder_len: 32, eval_examples: 16 }}\n  train: {{ steps: {steps}, batch_size: 4, eval_every: 3, log_every: 1, checkpoint_every: 3, warmup_steps: 2, eval_batch_size: 8 }}\ngrid:\n  model.num_experts: {experts}\nbaseline: {{ model.num_experts: 1 }}\n{extra}",
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

/// `probe` on a sweep where one finished run's checkpoint is damaged: that run is named on
/// stderr and skipped, the others are probed, and the exit status says not all were.
#[test]
fn probe_names_a_run_whose_checkpoint_is_damaged_and_probes_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let grid = grid_with(tmp.path(), "probed", 3, "[1, 2, 4]", "flops_per_token: free\n");
    let results = tmp.path().join("results");
    run_ok(switchlab().arg("sweep").arg(&grid).arg("--results").arg(&results).stderr(Stdio::piped()));
    // The two Switch runs (the dense one has no router to probe).
    let runs: Vec<PathBuf> = std::fs::read_dir(results.join("probed/runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|r| !std::fs::read_to_string(r.join("config.yaml")).unwrap().contains("num_experts: 1\n"))
        .collect();
    assert_eq!(runs.len(), 2);
    std::fs::write(runs[0].join("checkpoint/state.json"), "{\"step\": 3").unwrap();
    let out = switchlab().arg("probe").arg(results.join("probed")).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{stdout}{stderr}");
    let id = |run: &Path| run.file_name().unwrap().to_string_lossy().to_string();
    assert!(stderr.contains(&format!("{}: not probed: cannot read the checkpoint", id(&runs[0]))), "{stderr}");
    assert!(stderr.contains("1 finished run(s) not probed"), "{stderr}");
    assert!(stdout.lines().any(|l| l.starts_with(&id(&runs[1])) && l.contains(".moe.router")), "{stdout}");
    assert!(!stdout.contains(&id(&runs[0])), "{stdout}");
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

/// Every run's metrics.csv without wall_s and cpu_s (the columns no two runs share) and routing.csv.
fn logs_by_run(sweep: &Path) -> std::collections::BTreeMap<String, (Vec<String>, String)> {
    let mut out = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(sweep.join("runs")).unwrap() {
        let dir = entry.unwrap().path();
        let metrics = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
        let rows = metrics
            .lines()
            .map(|l| {
                l.split(',')
                    .enumerate()
                    .filter(|(i, _)| *i != 2 && *i != 3)
                    .map(|(_, c)| c)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect();
        let routing = std::fs::read_to_string(dir.join("routing.csv")).unwrap();
        out.insert(dir.file_name().unwrap().to_string_lossy().into_owned(), (rows, routing));
    }
    out
}

/// Metrics rows written so far by all runs of a sweep folder.
fn rows_logged(sweep: &Path) -> usize {
    let Ok(dirs) = std::fs::read_dir(sweep.join("runs")) else { return 0 };
    dirs.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("metrics.csv")).ok())
        .map(|m| m.lines().count().saturating_sub(1))
        .sum()
}

/// When to SIGKILL a sweep: after N more metrics rows than at its start, or after N ms.
enum Moment {
    Rows(usize),
    Millis(u64),
}

#[test]
fn kill_9_at_varied_moments_resumes_to_bit_identical_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let grid = grid_with(tmp.path(), "kill", 30, "[1, 2, 4, 8]", "");
    let sweep = |results: &Path| {
        let mut c = switchlab();
        c.arg("sweep").arg(&grid).arg("--results").arg(results).args(["--jobs", "2", "--threads", "1"]);
        c.stdout(Stdio::null()).stderr(Stdio::null());
        c
    };
    let straight = tmp.path().join("straight");
    assert!(sweep(&straight).status().unwrap().success());

    let killed = tmp.path().join("killed");
    // Startup (tokenizer cache, lock), mid-run, across a checkpoint, after some runs are done.
    let moments = [Moment::Millis(40), Moment::Rows(5), Moment::Millis(300), Moment::Rows(13), Moment::Rows(30)];
    let mut kills = 0;
    for moment in moments {
        let before = rows_logged(&killed.join("kill"));
        let start = Instant::now();
        let mut child = sweep(&killed).spawn().unwrap();
        loop {
            if child.try_wait().unwrap().is_some() {
                break; // finished before this moment: nothing left to kill
            }
            let due = match moment {
                Moment::Rows(n) => rows_logged(&killed.join("kill")) >= before + n,
                Moment::Millis(ms) => start.elapsed() >= Duration::from_millis(ms),
            };
            if due {
                child.kill().unwrap(); // SIGKILL: no handler runs, no checkpoint is written
                child.wait().unwrap();
                kills += 1;
                let rows = rows_logged(&killed.join("kill"));
                eprintln!("kill {kills} after {:?}: {rows} metrics rows on disk", start.elapsed());
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(120), "the sweep made no progress");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    assert!(kills >= 4, "only {kills} kills landed: make the sweep longer");
    assert!(sweep(&killed).status().unwrap().success(), "the same command resumes after kill -9");

    let (want, got) = (logs_by_run(&straight.join("kill")), logs_by_run(&killed.join("kill")));
    assert_eq!(want.len(), 4);
    assert_eq!(want.keys().collect::<Vec<_>>(), got.keys().collect::<Vec<_>>());
    for (id, (metrics, routing)) in &want {
        assert_eq!(metrics.len(), 31, "{id}: header + one row per step");
        assert_eq!(metrics, &got[id].0, "{id}: metrics.csv differs from the uninterrupted sweep");
        assert_eq!(routing, &got[id].1, "{id}: routing.csv differs from the uninterrupted sweep");
        let s: serde_json::Value =
            serde_json::from_slice(&std::fs::read(killed.join("kill/runs").join(id).join("status.json")).unwrap())
                .unwrap();
        assert_eq!(
            (s["state"].as_str(), s["steps_done"].as_u64()),
            (Some("done"), Some(30)),
            "{id}: no run left running"
        );
    }
    assert!(!killed.join("kill/.lock").exists());
}

fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "must fail: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn models_too_big_for_memory_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results");
    // 10⁹ experts plan (equal FLOPs per token) but need petabytes: refused by plan and sweep.
    let huge = grid_with(tmp.path(), "huge", 6, "[1, 1000000000]", "");
    let csv =
        run_ok(switchlab().args(["plan", "--format", "csv", "--max-memory", "1E"]).arg(&huge).stderr(Stdio::null()));
    let rows: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    assert_eq!(rows[0].last(), Some(&"mem_bytes"));
    let big: f64 = rows[2].last().unwrap().parse().unwrap();
    assert!(big > 1e14 && big.is_finite(), "{big}");
    let id = rows[2][0];
    for args in [&["plan"][..], &["plan", "--max-memory", "64G"], &["sweep", "--results"]] {
        let mut cmd = switchlab();
        cmd.args(args);
        if args[0] == "sweep" {
            cmd.arg(&results);
        }
        let err = run_err(cmd.arg(&huge));
        assert!(err.contains("huge.yaml") && err.contains(id) && err.contains("TiB of memory"), "{err}");
        assert!(err.contains("Fix:"), "{err}");
    }
    assert!(!results.exists(), "nothing written");
    // A Slurm task (`switchlab train`) on a node without the memory fails its run, never leaves it running.
    let cluster = tmp.path().join("cluster");
    let dry = ["sweep", "--backend", "slurm", "--dry-run", "--max-memory", "1E", "--results"];
    run_ok(switchlab().args(dry).arg(&cluster).arg(&huge));
    let run = cluster.join("huge/runs").join(id);
    let err = run_err(switchlab().arg("train").arg(run.join("config.yaml")));
    assert!(err.contains(id) && err.contains("MemAvailable"), "{err}");
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("status.json")).unwrap()).unwrap();
    assert!(s["state"] == "failed" && s["error"].as_str().unwrap().contains("of memory"), "{s}");
    let table = run_ok(switchlab().args(["plan", "--max-memory", "1E"]).arg(&huge));
    assert!(table.lines().next().unwrap().trim_end().ends_with("mem") && table.contains("TiB"), "{table}");

    // Two micro runs fit one at a time under a limit, not two at once.
    let micro = micro_grid(tmp.path(), 6);
    let csv = run_ok(switchlab().args(["plan", "--format", "csv"]).arg(&micro));
    let mems: Vec<f64> = csv.lines().skip(1).map(|l| l.rsplit(',').next().unwrap().parse().unwrap()).collect();
    let limit = format!("{:.0}", mems.iter().cloned().fold(0.0, f64::max).ceil() + 1.0);
    run_ok(switchlab().args(["plan", "--jobs", "1", "--max-memory", &limit]).arg(&micro));
    let err = run_err(switchlab().args(["plan", "--jobs", "2", "--max-memory", &limit]).arg(&micro));
    assert!(err.contains("2 runs at once") && err.contains("--jobs 1"), "{err}");
    let err = run_err(switchlab().arg("sweep").arg(&micro).arg("--results").arg(&results).args([
        "--jobs",
        "2",
        "--max-memory",
        &limit,
    ]));
    assert!(err.contains("2 runs at once"), "{err}");
    let err = run_err(switchlab().args(["plan", "--max-memory", "lots"]).arg(&micro));
    assert!(err.contains("--max-memory: `lots`") && err.contains("8G"), "{err}");
    assert!(!results.exists(), "nothing written");
}

#[test]
fn empty_grids_and_bad_slurm_settings_are_refused_at_plan_time() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results");
    for text in ["", "\n  \n", "# only a comment\n---\n"] {
        let empty = tmp.path().join("empty.yaml");
        std::fs::write(&empty, text).unwrap();
        let err = run_err(switchlab().arg("plan").arg(&empty));
        assert!(err.contains("empty.yaml") && err.contains("grid file is empty"), "{err}");
    }
    for (block, key, allowed) in
        [("slurm:\n  time: forever\n", "slurm.time", "HH:MM:SS"), ("slurm:\n  mem: lots\n", "slurm.mem", "4G")]
    {
        let grid = grid_with(tmp.path(), "cluster", 6, "[1, 4]", block);
        for cmd in [&["plan"][..], &["sweep", "--backend", "local", "--results"]] {
            let mut c = switchlab();
            c.args(cmd);
            if cmd[0] == "sweep" {
                c.arg(&results);
            }
            let err = run_err(c.arg(&grid));
            assert!(err.contains("cluster.yaml") && err.contains(key) && err.contains(allowed), "{block}: {err}");
        }
    }
    assert!(!results.exists(), "nothing written");
    // Slurm's own spellings are accepted; a required partition is only needed to submit.
    let grid = grid_with(
        tmp.path(),
        "ok",
        6,
        "[1, 4]",
        "slurm:\n  time: UNLIMITED\n  mem: \"4000\"\n  require_partition: true\n",
    );
    run_ok(switchlab().arg("plan").arg(&grid));
}

/// Peak resident memory (VmHWM) of a process so far, bytes; `None` once it has exited.
fn peak_rss(pid: u32) -> Option<f64> {
    switch_model::procfs::status_bytes(Some(pid), "VmHWM").map(|b| b as f64)
}

#[test]
fn the_memory_estimate_bounds_the_measured_peak_of_a_parameter_heavy_run() {
    if peak_rss(std::process::id()).is_none() {
        eprintln!("no /proc/<pid>/status VmHWM here: nothing to measure");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // 4.2M parameters, most in 64 experts: weights, gradients and AdamW dominate the peak.
    let grid = grid_with(tmp.path(), "heavy", 2, "[64]", "");
    let text = std::fs::read_to_string(&grid).unwrap().replace("d_ff: 64", "d_ff: 512");
    std::fs::write(&grid, text.replace("num_experts: 1 }", "num_experts: 64 }")).unwrap();
    let csv = run_ok(switchlab().args(["plan", "--format", "csv"]).arg(&grid));
    let estimate: f64 = csv.lines().nth(1).unwrap().rsplit(',').next().unwrap().parse().unwrap();
    let mut child = switchlab()
        .arg("sweep")
        .arg(&grid)
        .arg("--results")
        .arg(tmp.path().join("results"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut peak = 0.0f64;
    while child.try_wait().unwrap().is_none() {
        peak = peak.max(peak_rss(child.id()).unwrap_or(0.0));
        std::thread::sleep(Duration::from_millis(2));
    }
    eprintln!("peak RSS {:.1} MiB, estimate {:.1} MiB", peak / 1048576.0, estimate / 1048576.0);
    assert!(peak > 50e6, "the run's weights and AdamW moments were measured ({peak} bytes)");
    assert!(peak <= estimate, "measured peak {peak} bytes above the estimate {estimate}");
    let model = estimate - switch_runner::grid::PROCESS_BYTES;
    assert!(model < 1.5 * peak, "the estimate {estimate} is within reason of the measured {peak}");
}

/// The product's commands, and no benchmark harness (that is the `switch-bench` binary).
#[test]
fn help_lists_the_product_commands_only() {
    let help = run_ok(switchlab().arg("--help"));
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(commands, ["plan", "sweep", "status", "train", "report", "probe", "help"], "{help}");
    assert!(!help.contains("bench"), "{help}");
    assert!(!switchlab().args(["bench", "report"]).output().unwrap().status.success(), "no `bench` subcommand");
}

/// Under `ulimit -v`, a model that fits the machine's MemAvailable but not the address space is
/// refused at plan time with the figures, and nothing (no lock, no folder) is written.
#[test]
fn a_model_over_the_address_space_limit_is_refused_at_plan_time() {
    let tmp = tempfile::tempdir().unwrap();
    let grid = grid_with(tmp.path(), "vlimit", 6, "[1, 2048]", "");
    std::fs::write(&grid, std::fs::read_to_string(&grid).unwrap().replace("d_ff: 64", "d_ff: 1024")).unwrap();
    let csv =
        run_ok(switchlab().args(["plan", "--format", "csv", "--max-memory", "1E"]).arg(&grid).stderr(Stdio::null()));
    let need: f64 = csv.lines().nth(2).unwrap().rsplit(',').next().unwrap().parse().unwrap();
    let limit_kib = (need / 1024.0 / 2.0) as u64; // half what the model needs
    let results = tmp.path().join("results");
    let script = format!("ulimit -v {limit_kib} && exec \"$0\" sweep \"$1\" --results \"$2\"");
    let err =
        run_err(Command::new("sh").arg("-c").arg(script).arg(env!("CARGO_BIN_EXE_switchlab")).arg(&grid).arg(&results));
    assert!(err.contains("of memory") && err.contains("vlimit.yaml"), "{err}");
    if switch_model::procfs::mem_available_bytes().is_some_and(|b| b as f64 > need) {
        assert!(err.contains(&format!("ulimit -v {limit_kib}")), "the address-space limit is named: {err}");
    }
    assert!(!results.exists(), "nothing written, no lock left");
}

/// `switchlab train` checks a config.yaml edited by hand as a grid's would be, naming the file
/// and the key, instead of panicking in the memory estimate.
#[test]
fn train_refuses_an_invalid_hand_edited_config() {
    let tmp = tempfile::tempdir().unwrap();
    let grid = grid_with(tmp.path(), "edited", 6, "[1]", "");
    let cluster = tmp.path().join("cluster");
    run_ok(switchlab().args(["sweep", "--backend", "slurm", "--dry-run", "--results"]).arg(&cluster).arg(&grid));
    let run = std::fs::read_dir(cluster.join("edited/runs")).unwrap().next().unwrap().unwrap().path();
    let config = run.join("config.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("encoder_len: 32"), "{text}");
    std::fs::write(&config, text.replace("encoder_len: 32", "encoder_len: 0")).unwrap();
    let err = run_err(switchlab().arg("train").arg(&config));
    assert!(err.contains("config.yaml") && err.contains("encoder_len"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
