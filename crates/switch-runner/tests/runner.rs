use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use switch_runner::rundir::{RunDir, State, StatusFile};
use switch_runner::sweep::{self, SweepOptions};
use switch_runner::train::{self, Outcome};

/// A small real-text corpus (the start of each embedded book) so tests tokenize in milliseconds.
fn corpus(dir: &Path) -> PathBuf {
    switch_data::corpus::write_excerpt(&dir.join("corpus"), 200_000).unwrap()
}

fn grid(dir: &Path, name: &str, body: &str) -> PathBuf {
    let settings = format!(
        "settings:\n  model: {{ d_model: 32, d_ff: 64, num_heads: 2, d_kv: 16, num_encoder_layers: 2, num_decoder_layers: 1 }}\n  data: {{ corpus: {}, tokenizer: byte, encoder_len: 32, eval_examples: 16 }}\n  train: {{ steps: 12, batch_size: 4, eval_every: 4, log_every: 2, checkpoint_every: 4, warmup_steps: 4, eval_batch_size: 8 }}\n",
        corpus(dir).display()
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, format!("name: {name}\n{settings}{body}")).unwrap();
    path
}

/// Sweep options under `root`: one run at a time on one thread, failed runs not retried, no
/// memory limit.
fn one_at_a_time(root: PathBuf) -> SweepOptions {
    SweepOptions { results_root: root, jobs: Some(1), threads_per_run: Some(1), retry_failed: false, max_memory: None }
}

fn plan_err(dir: &Path, name: &str, body: &str) -> String {
    format!("{:#}", switch_runner::plan(&grid(dir, name, body)).expect_err("must fail"))
}

#[test]
fn sweeps_train_seed_by_seed_in_the_grids_seed_order() {
    // The plan lists runs point by point; a sweep trains every point of the first seed first, so
    // paired arms train close together in time.
    let tmp = tempfile::tempdir().unwrap();
    let p = switch_runner::plan(&grid(
        tmp.path(),
        "s",
        "grid:\n  model.num_experts: [1, 2, 4]\nseeds: [7, 3]\nbaseline: { model.num_experts: 1 }\n",
    ))
    .unwrap();
    let order: Vec<(u64, usize)> = sweep::seed_major(p.runs.iter().collect())
        .iter()
        .map(|r| (r.config.train.seed, r.config.model.num_experts))
        .collect();
    assert_eq!(order, vec![(7, 1), (7, 2), (7, 4), (3, 1), (3, 2), (3, 4)]);
}

#[test]
fn grids_expand_cartesian_zip_points_exclude_and_seeds() {
    let tmp = tempfile::tempdir().unwrap();
    let p = switch_runner::plan(&grid(tmp.path(), "g", "grid:\n  model.num_experts: [1, 2, 4]\n  model.capacity_factor: [1.0, 2.0]\nexclude:\n  - { model.num_experts: 1, model.capacity_factor: 2.0 }\nseeds: [0, 1]\nbaseline: { model.num_experts: 1 }\n")).unwrap();
    // 3 × 2 − 1 excluded = 5 points, × 2 seeds.
    assert_eq!(p.runs.len(), 10);
    assert_eq!(p.runs.iter().filter(|r| r.is_baseline).count(), 2);
    let experts: Vec<usize> = p.runs.iter().map(|r| r.config.model.num_experts).collect();
    assert_eq!(experts, vec![1, 1, 2, 2, 2, 2, 4, 4, 4, 4]);
    assert!(p.runs.iter().all(|r| r.flops_ratio == 1.0));

    let z = switch_runner::plan(&grid(tmp.path(), "z", "zip:\n  model.num_experts: [1, 4, 4]\n  model.top_k: [1, 1, 2]\npoints:\n  - { model.num_experts: 8 }\nbaseline: { model.num_experts: 1 }\nflops_per_token: free\n")).unwrap();
    let pairs: Vec<(usize, usize)> =
        z.runs.iter().map(|r| (r.config.model.num_experts, r.config.model.top_k)).collect();
    assert_eq!(pairs, vec![(1, 1), (4, 1), (4, 2), (8, 1)]);
    assert!(z.runs[2].flops_ratio > 1.05, "top-2 costs more");
    // Plans are deterministic: the same grid gives the same run ids.
    let again = switch_runner::plan(&tmp.path().join("z.yaml")).unwrap();
    assert_eq!(
        z.runs.iter().map(|r| &r.run_id).collect::<Vec<_>>(),
        again.runs.iter().map(|r| &r.run_id).collect::<Vec<_>>()
    );
    let seeded = switch_runner::grid::plan_with_seeds(&tmp.path().join("z.yaml"), Some(&[3, 4])).unwrap();
    assert_eq!(seeded.runs.iter().map(|r| r.config.train.seed).collect::<Vec<_>>(), vec![3, 4, 3, 4, 3, 4, 3, 4]);
    assert!(z.table(true).starts_with("run_id,model.num_experts,model.top_k,train.seed,baseline,params_total"));
}

#[test]
fn flops_are_matched_or_solved_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let err = plan_err(
        tmp.path(),
        "mm",
        "zip:\n  model.num_experts: [1, 4]\n  model.top_k: [1, 2]\nbaseline: { model.num_experts: 1 }\n",
    );
    assert!(
        err.contains("mm.yaml") && err.contains("match_baseline refuses 1 point") && err.contains("solve"),
        "{err}"
    );

    // Switch+ style: solve d_ff of a top-1 point to the FLOPs of a top-2 point.
    let p = switch_runner::plan(&grid(tmp.path(), "solve", "zip:\n  model.num_experts: [1, 4, 4]\n  model.top_k: [1, 2, 1]\n  model.d_ff: [64, 64, 64]\nbaseline: { model.num_experts: 1 }\nflops_per_token: { solve: model.d_ff, points: { model.top_k: 1, model.num_experts: 4 }, target: { model.top_k: 2 } }\n")).unwrap();
    let (moe, plus) = (&p.runs[1], &p.runs[2]);
    assert!(plus.config.model.d_ff > 64);
    assert!((plus.accounting.flops_per_token / moe.accounting.flops_per_token - 1.0).abs() < 0.01);
    assert_eq!(plus.point["model.d_ff"], serde_json::json!(plus.config.model.d_ff));
}

#[test]
fn malformed_grids_name_the_file_key_and_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let e = plan_err(tmp.path(), "u1", "grid:\n  model.num_expert: [1, 2]\n");
    assert!(
        e.contains("u1.yaml")
            && e.contains("unknown key `model.num_expert`")
            && e.contains("did you mean `model.num_experts`"),
        "{e}"
    );
    let e = plan_err(tmp.path(), "u2", "gird:\n  model.num_experts: [1]\n");
    assert!(e.contains("unknown field `gird`") && e.contains("line 6") && e.contains("did you mean `grid`"), "{e}");
    // A value of the wrong type or outside an enum: the file, the key, the point, what to write.
    let e = plan_err(tmp.path(), "t", "grid:\n  model.num_experts: [one]\n");
    assert!(e.contains("t.yaml") && e.contains("model.num_experts = \"one\"") && e.contains("whole number"), "{e}");
    let e = plan_err(tmp.path(), "k", "points:\n  - {model.num_experts: 1}\n  - {train.kernels: bogus}\n");
    assert!(
        e.contains("k.yaml")
            && e.contains("train.kernels = \"bogus\"")
            && e.contains("`fused`, `plain`, `fused_router`"),
        "{e}"
    );
    // One from the settings is blamed on the settings, not on the first point.
    let st = tmp.path().join("st.yaml");
    std::fs::write(&st, "name: st\nsettings:\n  train.steps: -4\ngrid:\n  model.num_experts: [1]\n").unwrap();
    let e = format!("{:#}", switch_runner::plan(&st).expect_err("must fail"));
    assert!(e.contains("st.yaml") && e.contains("settings: train.steps = -4") && e.contains("whole number"), "{e}");
    let e = plan_err(tmp.path(), "s", "grid: [1\n");
    assert!(e.contains("s.yaml") && e.contains("line"), "{e}");
    let e = plan_err(tmp.path(), "obj", "grid:\n  data.objective: [causal]\n");
    assert!(
        e.contains("obj.yaml") && e.contains("causal_lm") && e.contains("span_corruption") && e.contains("prefix_lm"),
        "{e}"
    );
    // The causal LM is decoder-only, and only the causal LM is.
    let e = plan_err(tmp.path(), "dec", "grid:\n  data.objective: [causal_lm]\n");
    assert!(e.contains("dec.yaml") && e.contains("model.num_encoder_layers = 2") && e.contains("causal_lm"), "{e}");
    let e = plan_err(tmp.path(), "enc", "grid:\n  model.num_encoder_layers: [0]\n");
    assert!(
        e.contains("enc.yaml") && e.contains("model.num_encoder_layers = 0") && e.contains("span_corruption"),
        "{e}"
    );
    let e = plan_err(tmp.path(), "empty", "grid:\n  model.num_experts: []\n");
    assert!(e.contains("non-empty list"), "{e}");
    let e = plan_err(tmp.path(), "bad", "grid:\n  model.num_experts: [0]\n");
    assert!(e.contains("model.num_experts = 0"), "{e}");
    let e = plan_err(tmp.path(), "nob", "grid:\n  model.num_experts: [2]\nbaseline: { model.num_experts: 1 }\n");
    assert!(e.contains("baseline") && e.contains("matches no point"), "{e}");
}

fn read_metrics(dir: &Path) -> Vec<String> {
    // Everything but wall_s and cpu_s, which no two runs share.
    std::fs::read_to_string(dir.join("metrics.csv"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut c: Vec<&str> = l.split(',').collect();
            c.drain(2..4);
            c.join(",")
        })
        .collect()
}

#[test]
fn an_interrupted_run_resumes_to_the_same_numbers() {
    // Both optimizers, and AdamW with bf16 moments: the checkpoint holds each one's state bit for bit.
    let tmp = tempfile::tempdir().unwrap();
    let plan = switch_runner::plan(&grid(
        tmp.path(),
        "r",
        "points:\n  - { model.num_experts: 4 }\n  - { model.num_experts: 4, train.optimizer: adafactor }\n  - { model.num_experts: 4, train.optimizer_moments: bf16 }\n",
    ))
    .unwrap();
    assert_eq!(plan.runs.len(), 3);
    for planned in &plan.runs {
        let run = plan.run_file(planned);
        let data = sweep::datasets(&[&run.config.data], tmp.path()).unwrap();
        let ds = data.values().next().unwrap();
        let never = AtomicBool::new(false);

        let straight = RunDir::new(tmp.path().join(format!("straight-{}", planned.run_id)));
        straight.create(&run.yaml()).unwrap();
        assert_eq!(train::train(&run.config, ds, &straight, &never, &|_, _, _| {}).unwrap(), Outcome::Done);

        let resumed = RunDir::new(tmp.path().join(format!("resumed-{}", planned.run_id)));
        resumed.create(&run.yaml()).unwrap();
        let stop = AtomicBool::new(false);
        let out = train::train(&run.config, ds, &resumed, &stop, &|step, _, _| {
            if step == 6 {
                stop.store(true, Ordering::SeqCst)
            }
        })
        .unwrap();
        assert_eq!(out, Outcome::Interrupted);
        assert_eq!(resumed.read_status().unwrap().state, State::Running);
        assert_eq!(resumed.read_status().unwrap().steps_done, 6);
        // A crash after the checkpoint may leave extra log rows: they are dropped on resume.
        std::fs::write(
            resumed.path.join("metrics.csv"),
            std::fs::read_to_string(resumed.path.join("metrics.csv")).unwrap() + "8,1,2,3,4,5,6,7,8,9\n9,1,2",
        )
        .unwrap();
        assert_eq!(train::train(&run.config, ds, &resumed, &never, &|_, _, _| {}).unwrap(), Outcome::Done);
        assert_eq!(read_metrics(&straight.path), read_metrics(&resumed.path));
        assert_eq!(
            std::fs::read_to_string(straight.path.join("routing.csv")).unwrap(),
            std::fs::read_to_string(resumed.path.join("routing.csv")).unwrap()
        );
        let s = resumed.read_status().unwrap();
        assert_eq!((s.state, s.steps_done), (State::Done, 12));
        assert_eq!(s.final_eval_loss, straight.read_status().unwrap().final_eval_loss);
    }
    // The two optimizers really differ.
    let final_loss = |r: &switch_runner::grid::PlannedRun| {
        RunDir::new(tmp.path().join(format!("straight-{}", r.run_id))).read_status().unwrap().final_eval_loss
    };
    assert_ne!(final_loss(&plan.runs[0]), final_loss(&plan.runs[1]));
}

#[test]
fn a_diverging_run_fails_alone_and_done_runs_are_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let path = grid(tmp.path(), "f", "grid:\n  model.init_scale: [0.1, 1.0e30]\nbaseline: { model.init_scale: 0.1 }\n");
    let plan = switch_runner::plan(&path).unwrap();
    let opts = SweepOptions { jobs: Some(2), ..one_at_a_time(tmp.path().join("results")) };
    let summary = sweep::sweep(&plan, &opts).unwrap();
    assert_eq!(summary.done.len(), 1);
    assert_eq!(summary.failed.len(), 1);
    assert!(!summary.ok());
    let failed = RunDir::new(tmp.path().join("results/f/runs").join(&summary.failed[0].0)).read_status().unwrap();
    assert_eq!(failed.state, State::Failed);
    assert!(failed.error.unwrap().contains("loss became"));
    let done = RunDir::new(tmp.path().join("results/f/runs").join(&summary.done[0])).read_status().unwrap();
    assert_eq!(done.state, State::Done);
    // Rerunning skips the finished run and leaves the failed one alone unless asked.
    let again = sweep::sweep(&plan, &opts).unwrap();
    assert_eq!((again.done.len(), again.skipped_done.len(), again.skipped_failed.len()), (0, 1, 1));
    let retry = sweep::sweep(&plan, &SweepOptions { retry_failed: true, ..opts }).unwrap();
    assert_eq!(retry.failed.len(), 1);
}

/// A finished run whose `status.json` was damaged after the fact: the next sweep resumes it from
/// its final checkpoint without training, writes a new status with the same test score, and keeps
/// the damaged bytes; its logs and checkpoint are not touched. `switchlab status` says so.
#[test]
fn a_damaged_status_is_set_aside_and_the_run_recovered_from_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let plan = switch_runner::plan(&grid(tmp.path(), "d", "points:\n  - { model.num_experts: 2 }\n")).unwrap();
    let opts = one_at_a_time(tmp.path().join("results"));
    assert_eq!(sweep::sweep(&plan, &opts).unwrap().done.len(), 1);
    let dir = RunDir::new(tmp.path().join("results/d/runs").join(&plan.runs[0].run_id));
    let read = |name: &str| std::fs::read(dir.path.join(name)).unwrap();
    let before = dir.read_status().unwrap();
    let (metrics, tensors) = (read("metrics.csv"), read("checkpoint/tensors.bin"));
    let damaged = read("status.json")[..40].to_vec(); // cut off mid-write
    std::fs::write(dir.path.join("status.json"), &damaged).unwrap();
    assert!(matches!(dir.status_file(), StatusFile::Damaged(e) if e.contains("status.json: damaged")));
    let status_table = switch_runner::slurm::status_table(&tmp.path().join("results/d")).unwrap();
    let row = status_table.lines().find(|l| l.starts_with(plan.runs[0].run_id.as_str())).unwrap();
    assert_eq!(row.split_whitespace().nth(1), Some("damaged"), "{status_table}");

    let again = sweep::sweep(&plan, &opts).unwrap();
    assert_eq!(again.done, vec![plan.runs[0].run_id.clone()]);
    let after = dir.read_status().unwrap();
    assert_eq!((after.state, after.steps_done), (State::Done, 12));
    assert_eq!(after.final_test_loss, before.final_test_loss);
    let ck: switch_runner::rundir::CheckpointState = serde_json::from_slice(&read("checkpoint/state.json")).unwrap();
    assert!(after.wall_s >= Some(ck.wall_s) && after.cpu_s >= Some(ck.cpu_s), "the clocks go on from the checkpoint's");
    // It started when its folder was made (config.yaml, written once), as the lost status said.
    assert_eq!(Some(after.started_at), dir.created_at());
    assert!(after.started_at <= before.started_at, "{} > {}", after.started_at, before.started_at);
    assert_eq!(read("status.json.damaged"), damaged);
    assert_eq!((read("metrics.csv"), read("checkpoint/tensors.bin")), (metrics.clone(), tensors));

    // Damaged again (other bytes), and the checkpoint gone (deleted to save space): starting over
    // would drop the logs of a run that had finished, so the run fails saying so, its logs stay,
    // and the first damaged copy is not written over. Retrying failed runs does not change that.
    let damaged_again = read("status.json")[..30].to_vec();
    std::fs::write(dir.path.join("status.json"), &damaged_again).unwrap();
    std::fs::remove_dir_all(dir.path.join("checkpoint")).unwrap();
    for retry_failed in [false, true] {
        let refused =
            sweep::sweep(&plan, &SweepOptions { retry_failed, ..one_at_a_time(opts.results_root.clone()) }).unwrap();
        assert_eq!(refused.failed.len(), 1, "retry_failed {retry_failed}");
        let error = &refused.failed[0].1;
        assert!(error.contains("no checkpoint to resume from") && error.contains("not retrained"), "{error}");
        assert_eq!(read("metrics.csv"), metrics);
        assert_eq!(dir.read_status().unwrap().state, State::Failed);
    }
    assert_eq!((read("status.json.damaged"), read("status.json.damaged.2")), (damaged, damaged_again));
}

#[test]
fn a_second_sweep_on_the_same_folder_is_refused_and_bad_folders_fail_early() {
    let tmp = tempfile::tempdir().unwrap();
    let plan = switch_runner::plan(&grid(tmp.path(), "l", "grid:\n  model.num_experts: [1]\n")).unwrap();
    let root = tmp.path().join("results");
    std::fs::create_dir_all(root.join("l")).unwrap();
    let held = sweep::SweepLock::acquire(&root.join("l")).unwrap();
    let opts = SweepOptions {
        results_root: root.clone(),
        jobs: None,
        threads_per_run: None,
        retry_failed: false,
        max_memory: None,
    };
    let e = format!("{:#}", sweep::sweep(&plan, &opts).err().unwrap());
    assert!(e.contains("locked by another sweep"), "{e}");
    drop(held);
    let file_root = tmp.path().join("not-a-folder");
    std::fs::write(&file_root, "x").unwrap();
    let e = format!("{:#}", sweep::sweep(&plan, &SweepOptions { results_root: file_root, ..opts }).err().unwrap());
    assert!(e.contains("not-a-folder") && e.contains("writable"), "{e}");
}

/// Errors keep their kind up to the caller: the CLI (or a library user) can tell a bad grid from
/// a bad model setting, a bad corpus, a locked folder and a diverging run without parsing text.
#[test]
fn errors_are_typed_by_what_the_user_can_do() {
    use switch_runner::Error;
    let tmp = tempfile::tempdir().unwrap();
    let path = grid(tmp.path(), "t", "grid:\n  model.num_expert: [1]\n");
    match switch_runner::plan(&path).unwrap_err() {
        Error::Input { file, problem } => assert!(file == path && problem.contains("did you mean"), "{problem}"),
        e => panic!("expected Input, got {e:?}"),
    }
    let plan = switch_runner::plan(&grid(tmp.path(), "u", "grid:\n  model.num_experts: [1]\n")).unwrap();
    let mut data = plan.runs[0].config.data.clone();
    data.corpus = tmp.path().join("no-such-corpus").display().to_string();
    assert!(matches!(sweep::datasets(&[&data], tmp.path()).err().unwrap(), Error::Data(_)));
    let dev = switch_runner::train::Dev::default();
    let bad = switch_model::ModelConfig { top_k: 3, ..plan.runs[0].config.model.clone() };
    let e: Error = switch_model::SwitchTransformer::new(&dev, &bad, 0).err().unwrap().into();
    assert!(matches!(e, Error::Model(_)) && e.to_string().contains("top_k"), "{e}");
    let root = tmp.path().join("results");
    std::fs::create_dir_all(root.join("u")).unwrap();
    let _held = sweep::SweepLock::acquire(&root.join("u")).unwrap();
    assert!(matches!(sweep::SweepLock::acquire(&root.join("u")).err().unwrap(), Error::Folder(_)));
}

/// `probe_run` separates a trained router's gradient by source: both are there with α > 0, the
/// balance part is exactly 0 with α = 0, and a dense run has no router to probe.
#[test]
fn router_gradients_are_split_by_source_on_a_trained_run() {
    let tmp = tempfile::tempdir().unwrap();
    let body = "grid:\n  model.num_experts: [1, 4]\n  model.balance_loss_coef: [0.0, 0.01]\nflops_per_token: free\n";
    let plan = switch_runner::plan(&grid(tmp.path(), "p", body)).unwrap();
    let root = tmp.path().join("results");
    let opts = one_at_a_time(root.clone());
    assert!(sweep::sweep(&plan, &opts).unwrap().ok());
    let data = sweep::datasets(&[&plan.runs[0].config.data], &root).unwrap();
    let ds = data.values().next().unwrap();
    for r in &plan.runs {
        let dir = RunDir::new(root.join("p/runs").join(&r.run_id));
        let probed = switch_runner::probe::probe_run(&dir, &r.config, ds, 2).unwrap();
        let (experts, alpha) = (r.config.model.num_experts, r.config.model.balance_loss_coef);
        let Some(routers) = probed else {
            assert_eq!(experts, 1, "only dense runs have no router");
            continue;
        };
        // grid(): 2 encoder layers, 1 decoder layer, sparse every other layer → one router.
        assert_eq!(routers.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(), ["encoder.1.moe.router"]);
        assert!(routers[0].from_cross_entropy > 1e-6, "{routers:?}");
        if alpha == 0.0 {
            assert_eq!(routers[0].from_balance, 0.0, "{routers:?}");
        } else {
            assert!(routers[0].from_balance > 1e-6, "{routers:?}");
        }
    }
}

#[test]
fn empty_grid_files_are_refused_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    for text in ["", "   \n\n", "# nothing yet\n", "---\n# still nothing\n"] {
        let path = tmp.path().join("blank.yaml");
        std::fs::write(&path, text).unwrap();
        let e = format!("{:#}", switch_runner::plan(&path).expect_err("an empty grid must fail"));
        assert!(e.contains("blank.yaml") && e.contains("grid file is empty") && e.contains("grid:"), "{e}");
    }
}

#[test]
fn slurm_values_are_checked_when_planning_whatever_the_backend() {
    let tmp = tempfile::tempdir().unwrap();
    for (block, needle) in [
        ("slurm:\n  time: forever\n", "slurm.time: `forever` is not a Slurm time limit: use minutes"),
        ("slurm:\n  time: \"-5\"\n", "slurm.time"),
        ("slurm:\n  mem: lots\n", "slurm.mem: `lots` is not a Slurm memory size"),
        ("slurm:\n  mem: 4GB\n", "slurm.mem"),
        ("slurm:\n  cpus_per_task: 0\n", "slurm.cpus_per_task"),
        ("slurm:\n  extra: [\"account=ml\"]\n", "slurm.extra"),
    ] {
        let e = plan_err(tmp.path(), "cl", &format!("grid:\n  model.num_experts: [1]\n{block}"));
        assert!(e.contains("cl.yaml") && e.contains(needle), "{block}: {e}");
    }
    // Valid Slurm spellings plan; a required partition only matters when submitting.
    let ok =
        "grid:\n  model.num_experts: [1]\nslurm:\n  time: 2-00:00:00\n  mem: \"4000\"\n  require_partition: true\n";
    let p = switch_runner::plan(&grid(tmp.path(), "ok", ok)).unwrap();
    assert_eq!(p.slurm.as_ref().unwrap().mem_bytes(), Some(4000.0 * 1024.0 * 1024.0));
    let e = format!("{:#}", p.slurm.as_ref().unwrap().validate(&p.path).unwrap_err());
    assert!(e.contains("slurm.partition: is required"), "{e}");
}

#[test]
fn memory_is_estimated_from_the_shapes_and_oversized_sweeps_are_refused() {
    use switch_runner::grid::{human_bytes, parse_size, MemoryLimit, PROCESS_BYTES};
    let tmp = tempfile::tempdir().unwrap();
    // 10⁹ experts: equal FLOPs per token, so the plan is valid, but weights alone are petabytes.
    let path =
        grid(tmp.path(), "huge", "grid:\n  model.num_experts: [1, 1000000000]\nbaseline: { model.num_experts: 1 }\n");
    let plan = switch_runner::plan(&path).unwrap();
    let (dense, huge) = (&plan.runs[0], &plan.runs[1]);
    assert!(huge.memory.is_finite() && huge.memory > 24.0 * huge.accounting.params_total as f64);
    assert!(dense.memory > PROCESS_BYTES && dense.memory < PROCESS_BYTES + 64e6, "{}", dense.memory);
    let runs: Vec<_> = plan.runs.iter().collect();
    let limit = MemoryLimit { bytes: 64.0 * 2f64.powi(30), source: "allowed by --max-memory 64G".into() };
    let e = format!("{:#}", plan.check_memory(&runs, 1, Some(&limit)).unwrap_err());
    assert!(e.contains("huge.yaml") && e.contains(&huge.run_id) && e.contains("num_experts=1000000000"), "{e}");
    assert!(e.contains("TiB of memory") && e.contains("64.0 GiB allowed by --max-memory 64G"), "{e}");
    assert!(plan.check_memory(&runs, 1, None).is_ok(), "no limit known: nothing refused");
    // The sweep refuses before writing anything (MemAvailable as the limit, or an explicit one).
    let root = tmp.path().join("results");
    let opts = SweepOptions {
        results_root: root.clone(),
        jobs: None,
        threads_per_run: None,
        retry_failed: false,
        max_memory: Some(limit),
    };
    let e = format!("{:#}", sweep::sweep(&plan, &opts).unwrap_err());
    assert!(e.contains(&huge.run_id), "{e}");
    if MemoryLimit::available().is_some() {
        let e = format!("{:#}", sweep::sweep(&plan, &SweepOptions { max_memory: None, ..opts }).unwrap_err());
        assert!(e.contains("MemAvailable"), "{e}");
    }
    assert!(!root.exists(), "no results folder");

    // Two runs at once share one process: the check sums the `jobs` largest.
    let two = switch_runner::plan(&grid(tmp.path(), "two", "grid:\n  model.num_experts: [1, 8]\n")).unwrap();
    let runs: Vec<_> = two.runs.iter().collect();
    let largest = two.runs.iter().map(|r| r.memory).fold(0.0, f64::max);
    let limit = MemoryLimit { bytes: largest, source: "allowed".into() };
    assert!(two.check_memory(&runs, 1, Some(&limit)).is_ok());
    let e = format!("{:#}", two.check_memory(&runs, 2, Some(&limit)).unwrap_err());
    assert!(e.contains("2 runs at once") && e.contains("--jobs 1"), "{e}");

    assert_eq!(parse_size("8G"), Some(8.0 * 2f64.powi(30)));
    assert_eq!(parse_size("8GiB"), parse_size("8gb"));
    assert_eq!(parse_size("1.5T"), Some(1.5 * 2f64.powi(40)));
    assert_eq!(parse_size("4096"), Some(4096.0));
    assert_eq!((parse_size("lots"), parse_size("-1G"), parse_size("")), (None, None, None));
    assert_eq!(
        (human_bytes(512.0), human_bytes(1536.0 * 1024.0), human_bytes(3e15)),
        ("512 B".into(), "1.50 MiB".into(), "2.66 PiB".into())
    );
}

#[test]
fn the_memory_estimate_grows_with_every_shape_and_flags_the_base_preset_at_1024_experts() {
    let tmp = tempfile::tempdir().unwrap();
    let presets = tmp.path().join("presets");
    std::fs::create_dir_all(&presets).unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../experiments/presets/base.yaml"),
        presets.join("base.yaml"),
    )
    .unwrap();
    let path = tmp.path().join("big.yaml");
    std::fs::write(&path, "base: base\ngrid:\n  model.num_experts: [1, 1024]\nbaseline: { model.num_experts: 1 }\n")
        .unwrap();
    let plan = switch_runner::plan(&path).unwrap();
    let big = &plan.runs[1];
    // ≈ 2.1 × 10⁹ parameters: 24 bytes each for weights, gradients, their host copies and AdamW.
    assert!(big.accounting.params_total > 2_000_000_000);
    assert!(big.memory > 24.0 * big.accounting.params_total as f64, "{}", big.memory);
    let limit = switch_runner::grid::MemoryLimit { bytes: 32.0 * 2f64.powi(30), source: "allowed".into() };
    assert!(plan.check_memory(&plan.runs.iter().collect::<Vec<_>>(), 1, Some(&limit)).is_err());

    let base = switch_runner::grid::memory_bytes(&plan.runs[0].config);
    let mut grow = Vec::new();
    for f in [
        |c: &mut switch_runner::RunConfig| c.train.batch_size *= 2,
        |c: &mut switch_runner::RunConfig| c.train.eval_batch_size *= 8,
        |c: &mut switch_runner::RunConfig| c.data.encoder_len *= 2,
        |c: &mut switch_runner::RunConfig| c.model.d_ff *= 2,
        |c: &mut switch_runner::RunConfig| c.model.num_heads *= 2,
        |c: &mut switch_runner::RunConfig| c.model.vocab_size *= 2,
    ] {
        let mut c = plan.runs[0].config.clone();
        f(&mut c);
        grow.push(switch_runner::grid::memory_bytes(&c) > base);
    }
    assert_eq!(grow, vec![true; 6]);
}

#[test]
fn every_shipped_grid_plans_and_the_default_sweep_is_flop_matched() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments");
    let mut planned = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let plan = switch_runner::plan(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(!plan.runs.is_empty(), "{}", path.display());
            planned += 1;
        }
    }
    assert!(planned >= 10, "{planned} grids");
    // The default sweep: dense and 2, 4, 8 experts (and the paper-init Switch-8) at one FLOPs/token.
    let plan = switch_runner::plan(&dir.join("experts.yaml")).unwrap();
    let experts: Vec<usize> = plan.runs.iter().map(|r| r.config.model.num_experts).collect();
    assert_eq!(experts, [1, 2, 4, 8, 8]);
    let flops = plan.runs[0].accounting.flops_per_token;
    assert!(plan.runs.iter().all(|r| r.accounting.flops_per_token == flops));
}

// ---- Run identity ---------------------------------------------------------------------------
// A run id hashes the resolved config and `RESULTS_VERSION`. The two tests below fail when either
// can go stale silently: numerics that change without a version bump, and run ids that change
// without a change of numerics (e.g. a new config field serialized at its default).

/// The version the golden losses below were recorded with.
const GOLDEN_VERSION: u32 = 7;
/// (step, training loss) of a fixed Switch-4 micro run, then its final validation and test loss.
/// Compared to 3e-6 (a few f32 ulps at these losses, room for another CPU's summation order);
/// RMSNorm's epsilon moved from 1e-6 to 1e-5 changes them by up to 1.2e-5.
const GOLDEN_LOSSES: [(u64, f64); 8] = [
    (2, 5.996453),
    (4, 5.884294),
    (6, 5.680646),
    (8, 5.525897),
    (10, 5.520086),
    (12, 5.454025),
    (0, 5.400060653686523),
    (0, 5.443116903305054),
];

/// Both the default kernels and `fused`, which the committed reports made before 2026-12-06 pin,
/// give this micro run the golden losses (to the last printed digit).
#[test]
fn golden_losses_pin_the_numerics_to_results_version() {
    for kernels in ["", "  train.kernels: [fused]\n"] {
        golden_run_matches(&format!("grid:\n  model.num_experts: [4]\n{kernels}"));
    }
}

fn golden_run_matches(grid_text: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let plan = switch_runner::plan(&grid(tmp.path(), "golden", grid_text)).unwrap();
    let run = plan.run_file(&plan.runs[0]);
    let data = sweep::datasets(&[&run.config.data], tmp.path()).unwrap();
    let dir = RunDir::new(tmp.path().join("run"));
    dir.create(&run.yaml()).unwrap();
    let never = AtomicBool::new(false);
    assert_eq!(
        train::train(&run.config, data.values().next().unwrap(), &dir, &never, &|_, _, _| {}).unwrap(),
        Outcome::Done
    );
    let rows = std::fs::read_to_string(dir.path.join("metrics.csv")).unwrap();
    let mut got: Vec<(u64, f64)> = rows
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect::<Vec<_>>())
        .map(|c| (c[0].parse().unwrap(), c[5].parse().unwrap()))
        .collect();
    let status = dir.read_status().unwrap();
    got.push((0, status.final_eval_loss.unwrap()));
    got.push((0, status.final_test_loss.unwrap()));
    eprintln!("{got:?}");
    let close = got.len() == GOLDEN_LOSSES.len()
        && got.iter().zip(&GOLDEN_LOSSES).all(|(g, w)| g.0 == w.0 && (g.1 - w.1).abs() <= 3e-6);
    assert_eq!(
        (switch_runner::grid::RESULTS_VERSION, close),
        (GOLDEN_VERSION, true),
        "{grid_text}: the numerics changed ({got:?} against the golden {GOLDEN_LOSSES:?}): bump grid::RESULTS_VERSION, \
         then set GOLDEN_VERSION and GOLDEN_LOSSES to the new version and losses, and regenerate the committed reports"
    );
}

/// The default sweep's run ids, as in its committed report (`results/experts/report/summary.csv`).
#[test]
fn the_default_sweeps_run_ids_are_those_of_its_committed_report() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let plan = switch_runner::plan(&repo.join("experiments/experts.yaml")).unwrap();
    let planned: Vec<&str> = plan.runs.iter().map(|r| r.run_id.as_str()).collect();
    let summary = std::fs::read_to_string(repo.join("results/experts/report/summary.csv")).unwrap();
    let mut committed: Vec<&str> = summary.lines().skip(1).map(|l| l.split(',').next().unwrap()).collect();
    let mut sorted = planned.clone();
    sorted.sort_unstable();
    committed.sort_unstable();
    assert_eq!(
        sorted, committed,
        "experiments/experts.yaml now plans other run ids than its committed report: if the numerics changed, \
         bump RESULTS_VERSION and regenerate the report (`cargo sweep experts`); if not, a config change altered \
         the hash (keep new fields at their default out of the serialized config)"
    );
}

/// The grids whose committed reports today's code reproduces plan those reports' run ids: the
/// paper sweep (its runs set the fields added after version 7 away from their defaults) and the
/// three engine-option studies. Each sets `train.kernels: fused`, the default its runs were made
/// with, which keeps their ids ([`switch_runner::grid::unhashed_values`]).
#[test]
fn the_paper_and_engine_sweeps_run_ids_are_those_of_their_committed_reports() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for name in ["paper", "moments", "router-kernels", "slot-kernels"] {
        let plan = switch_runner::plan(&repo.join(format!("experiments/{name}.yaml"))).unwrap();
        let mut planned: Vec<&str> = plan.runs.iter().map(|r| r.run_id.as_str()).collect();
        let summary = std::fs::read_to_string(repo.join(format!("results/{name}/report/summary.csv"))).unwrap();
        let mut committed: Vec<&str> = summary.lines().skip(1).map(|l| l.split(',').next().unwrap()).collect();
        planned.sort_unstable();
        committed.sort_unstable();
        assert_eq!(planned, committed, "experiments/{name}.yaml plans other run ids than its committed report");
    }
}

/// A `config.yaml` saved before `train.kernels` existed reads as the kernels that trained it
/// (`fused`, the earlier default), so `switchlab train` resumes it with them under its own id.
#[test]
fn a_saved_config_without_the_kernels_key_reads_as_the_earlier_default() {
    use switch_runner::config::RunConfig;
    use switch_runner::grid::{run_id, unhashed_values};
    let tmp = tempfile::tempdir().unwrap();
    let plan =
        switch_runner::plan(&grid(tmp.path(), "old", "grid:\n  model.num_experts: [4]\n  train.kernels: [fused]\n"))
            .unwrap();
    let run = plan.run_file(&plan.runs[0]);
    let without: String =
        run.yaml().lines().filter(|l| !l.trim_start().starts_with("kernels:")).map(|l| format!("{l}\n")).collect();
    assert_ne!(without, run.yaml(), "the key was there to remove");
    let path = tmp.path().join("config.yaml");
    std::fs::write(&path, without).unwrap();
    let read = switch_rundir::RunFile::<RunConfig>::read(&path).unwrap();
    let earlier = unhashed_values()["train"]["kernels"].clone();
    assert_eq!((serde_json::to_value(read.config.train.kernels).unwrap(), earlier), ("fused".into(), "fused".into()));
    assert_eq!(run_id(&read.config), read.run_id, "the id its folder was made under");
}

/// A default that changed keeps the old runs' ids at its old value and gives the new default ids
/// of their own: the two never share a run folder.
#[test]
fn a_changed_default_gives_new_ids_and_keeps_the_old_ones_at_the_old_value() {
    use switch_model::kernels::KernelMode;
    use switch_runner::grid::{identity, run_id};
    let tmp = tempfile::tempdir().unwrap();
    let now = switch_runner::plan(&grid(tmp.path(), "now", "grid:\n  model.num_experts: [4]\n")).unwrap().runs[0]
        .config
        .clone();
    assert_eq!(now.train.kernels, KernelMode::FusedSlots);
    assert_eq!(identity(&now)["train"]["kernels"], "fused_slots");
    let before =
        switch_runner::plan(&grid(tmp.path(), "before", "grid:\n  model.num_experts: [4]\n  train.kernels: [fused]\n"))
            .unwrap()
            .runs[0]
            .config
            .clone();
    assert!(identity(&before)["train"].get("kernels").is_none(), "the old default stays out of the identity");
    assert_ne!(run_id(&now), run_id(&before));
}

/// Every config key outside the frozen `ALWAYS_HASHED` list stays out of a run's identity at its
/// default (a changed default: at its earlier one) and enters it when set: a field added to the config with a default changes no run id,
/// with no attribute on the field.
#[test]
fn fields_at_their_default_stay_out_of_the_run_id() {
    use switch_runner::grid::{identity, run_id, unhashed_values, ALWAYS_HASHED};
    let tmp = tempfile::tempdir().unwrap();
    let base = switch_runner::plan(&grid(tmp.path(), "id", "grid:\n  model.num_experts: [4]\n")).unwrap().runs[0]
        .config
        .clone();
    let always = |key: &str| {
        ALWAYS_HASHED.iter().any(|(s, f)| key.split_once('.').is_some_and(|(a, b)| a == *s && f.contains(&b)))
    };
    let newer: Vec<String> = switch_runner::config::valid_keys().into_iter().filter(|k| !always(k)).collect();
    assert!(newer.len() >= 8, "{newer:?}");
    let mut changed = std::collections::HashSet::new();
    for key in &newer {
        let (section, field) = key.split_once('.').unwrap();
        let at_default = identity(&switch_runner::config::RunConfig::default());
        let today = serde_json::to_value(switch_runner::config::RunConfig::default()).unwrap();
        let changed_default = unhashed_values()[section][field] != today[section][field];
        assert_eq!(at_default[section].get(field).is_some(), changed_default, "{key} at its default");
        // Set the key away from its default through the same path a grid takes.
        let mut tree = serde_json::to_value(&base).unwrap();
        let other = match (section, field) {
            ("model", "router") => serde_json::json!("hash"),
            ("data", "objective") => serde_json::json!("prefix_lm"),
            ("train", "optimizer") => serde_json::json!("adafactor"),
            ("train", "kernels") => serde_json::json!("plain"),
            ("train", "optimizer_moments") => serde_json::json!("bf16"),
            ("model", "group_size") => serde_json::json!(2),
            _ => serde_json::json!(0.5),
        };
        tree[section][field] = other;
        let cfg: switch_runner::config::RunConfig = serde_json::from_value(tree).unwrap();
        assert!(identity(&cfg)[section].get(field).is_some(), "{key} set is not in the identity");
        assert!(changed.insert(run_id(&cfg)), "{key}: a run id repeats");
    }
    assert!(!changed.contains(&run_id(&base)));
}

// ---- Hostile grids: each fails fast with a message naming the key ----------------------------

#[test]
fn an_unknown_field_inside_flops_solve_is_refused_with_a_hint() {
    let tmp = tempfile::tempdir().unwrap();
    let err = plan_err(tmp.path(), "typo", "grid:\n  model.num_experts: [1, 4]\nbaseline: { model.num_experts: 1 }\nflops_per_token: { solve: model.d_ff, piont: { model.num_experts: 4 } }\n");
    assert!(
        err.contains("typo.yaml") && err.contains("unknown field `piont`") && err.contains("did you mean `points`"),
        "{err}"
    );
    let err = plan_err(tmp.path(), "mode", "grid:\n  model.num_experts: [1, 4]\nflops_per_token: match_baselin\n");
    assert!(err.contains("match_baselin") && err.contains("match_baseline, free"), "{err}");
}

#[test]
fn solving_a_huge_size_is_bounded() {
    // A bisection: the old scan over 1..4·d_ff took minutes at d_ff 5·10⁸.
    let tmp = tempfile::tempdir().unwrap();
    let start = std::time::Instant::now();
    let result = switch_runner::plan(&grid(tmp.path(), "huge", "zip:\n  model.num_experts: [1, 4]\n  model.d_ff: [64, 500000000]\nbaseline: { model.num_experts: 1 }\nflops_per_token: { solve: model.d_ff }\n"));
    let p = result.unwrap();
    assert_eq!(p.runs[1].config.model.d_ff, 64, "solved back to the baseline's FLOPs");
    assert!(start.elapsed().as_secs() < 20, "{:?}", start.elapsed());
}

#[test]
fn a_grid_too_large_to_expand_is_refused_before_expanding() {
    let tmp = tempfile::tempdir().unwrap();
    let forty: Vec<String> = (1..=40).map(|i| i.to_string()).collect();
    let list = format!("[{}]", forty.join(", "));
    let keys = ["model.d_ff", "model.d_model", "train.steps", "train.batch_size", "model.num_experts", "model.d_kv"];
    let body: String = keys.iter().map(|k| format!("  {k}: {list}\n")).collect();
    let err = plan_err(tmp.path(), "big", &format!("grid:\n{body}"));
    assert!(err.contains("4096000000 runs") && err.contains("max_runs"), "{err}");
    // The limit is the grid's to raise.
    let err = plan_err(tmp.path(), "small", "grid:\n  model.num_experts: [1, 2, 4]\nseeds: [0, 1]\nmax_runs: 5\n");
    assert!(err.contains("6 runs") && err.contains("limit of 5"), "{err}");
}

#[test]
fn too_many_threads_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let plan = switch_runner::plan(&grid(tmp.path(), "threads", "grid:\n  model.num_experts: [1]\n")).unwrap();
    let opts = SweepOptions { threads_per_run: Some(100_000), ..one_at_a_time(tmp.path().join("results")) };
    let err = format!("{:#}", sweep::sweep(&plan, &opts).expect_err("must fail"));
    assert!(err.contains("--threads 100000") && err.contains("per core"), "{err}");
    assert!(!tmp.path().join("results").exists());
}

/// An interrupted Switch-4 run (checkpoint at step 4) in `tmp/<name>`, with its config and data.
fn interrupted(tmp: &Path, name: &str) -> (switch_runner::grid::RunFile, RunDir, std::sync::Arc<switch_data::Dataset>) {
    let plan = switch_runner::plan(&grid(tmp, name, "grid:\n  model.num_experts: [4]\n")).unwrap();
    let run = plan.run_file(&plan.runs[0]);
    let mut data = sweep::datasets(&[&run.config.data], tmp).unwrap();
    let ds = data.drain().next().unwrap().1;
    let dir = RunDir::new(tmp.join(format!("run-{name}")));
    dir.create(&run.yaml()).unwrap();
    let stop = AtomicBool::new(false);
    let out = train::train(&run.config, &ds, &dir, &stop, &|step, _, _| {
        if step == 4 {
            stop.store(true, Ordering::SeqCst)
        }
    })
    .unwrap();
    assert_eq!(out, Outcome::Interrupted);
    (run, dir, ds)
}

#[test]
fn a_damaged_checkpoint_fails_its_run_naming_the_file_and_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let never = AtomicBool::new(false);
    let damage: [(&str, fn(&Path)); 3] = [
        ("state.json", |c| std::fs::write(c.join("state.json"), b"\x00garbage").unwrap()),
        ("tensors.bin", |c| {
            let t = std::fs::read(c.join("tensors.bin")).unwrap();
            std::fs::write(c.join("tensors.bin"), &t[..t.len() / 2]).unwrap()
        }),
        ("tensors.bin", |c| std::fs::remove_file(c.join("tensors.bin")).unwrap()),
    ];
    for (i, (file, damage)) in damage.into_iter().enumerate() {
        let (run, dir, ds) = interrupted(tmp.path(), &format!("ck{i}"));
        damage(&dir.path.join("checkpoint"));
        let err = format!("{:#}", train::train(&run.config, &ds, &dir, &never, &|_, _, _| {}).expect_err("must fail"));
        let named = err.contains(file) || err.contains(&dir.path.join("checkpoint").display().to_string());
        assert!(named && err.contains("Delete") && err.contains("from scratch"), "{err}");
    }
}

#[test]
fn garbage_after_an_interrupted_runs_logs_is_dropped_on_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, dir, ds) = interrupted(tmp.path(), "torn");
    let metrics = dir.path.join("metrics.csv");
    let mut bytes = std::fs::read(&metrics).unwrap();
    bytes.extend_from_slice(b"\xff\xfe\x00garbage,1,2\n4,\xc3\x28torn");
    std::fs::write(&metrics, bytes).unwrap();
    let never = AtomicBool::new(false);
    assert_eq!(train::train(&run.config, &ds, &dir, &never, &|_, _, _| {}).unwrap(), Outcome::Done);
    let text = std::fs::read_to_string(&metrics).expect("clean UTF-8 again");
    let steps: Vec<u64> = text.lines().skip(1).map(|l| l.split(',').next().unwrap().parse().unwrap()).collect();
    assert_eq!(steps, [2, 4, 6, 8, 10, 12]);
}

#[test]
fn typos_in_selectors_and_bad_tolerances_are_refused_and_group_size_is_settable() {
    let tmp = tempfile::tempdir().unwrap();
    let g = "grid:\n  model.num_experts: [1, 4]\nbaseline: { model.num_experts: 1 }\n";
    let cases = [
        (
            "exclude:\n  - { model.num_expert: 4 }\n",
            "exclude[0]: unknown key `model.num_expert`; did you mean `model.num_experts`?",
        ),
        ("exclude:\n  - { model.num_experts: 3 }\n", "exclude[0]"),
        (
            "flops_per_token: { solve: model.d_ff, points: { model.top_kk: 1 } }\n",
            "flops_per_token.points: unknown key `model.top_kk`",
        ),
        ("tolerance: .nan\n", "tolerance = NaN: use a finite fraction"),
        ("tolerance: -0.1\n", "tolerance = -0.1: use a finite fraction"),
    ];
    for (i, (extra, needle)) in cases.iter().enumerate() {
        let err = plan_err(tmp.path(), &format!("t{i}"), &format!("{g}{extra}"));
        assert!(err.contains(needle), "{extra}: {err}");
    }
    // model.group_size is a documented key: settable (a group that does not divide the batch
    // leaves a shorter last group), and checked.
    let p = switch_runner::plan(&grid(tmp.path(), "gs", "grid:\n  model.num_experts: [4]\n  model.group_size: [2]\n"))
        .unwrap();
    assert_eq!(p.runs[0].config.model.group_size, Some(2));
    let err = plan_err(tmp.path(), "gs0", "grid:\n  model.num_experts: [4]\n  model.group_size: [0]\n");
    assert!(err.contains("group_size") && err.contains("at least 1"), "{err}");
}
