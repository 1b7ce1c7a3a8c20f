//! The run-folder format read back as written.
use switch_rundir::{RunDir, State, Status};

#[test]
fn status_round_trips_and_partial_files_read_with_defaults() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = RunDir::new(tmp.path());
    let mut s = Status::new(900, 1000, 800, 5e5);
    s.state = State::Done;
    s.final_eval_neg_log_perplexity = Some(-4.5);
    dir.write_status(&s).unwrap();
    assert_eq!(dir.read_status(), Some(s));
    let text = std::fs::read_to_string(tmp.path().join("status.json")).unwrap();
    assert!(text.contains("\"state\": \"done\""), "{text}");
    // a hand-written or older file: only the state
    std::fs::write(tmp.path().join("status.json"), r#"{"state": "failed", "error": "boom"}"#).unwrap();
    let read = dir.read_status().unwrap();
    assert_eq!((read.state, read.error.as_deref(), read.steps_total), (State::Failed, Some("boom"), 0));
    // an unknown state is not a status
    std::fs::write(tmp.path().join("status.json"), r#"{"state": "sleeping"}"#).unwrap();
    assert_eq!(dir.read_status(), None);
}

#[test]
fn checkpoints_round_trip_tensor_by_tensor_and_refuse_another_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = RunDir::new(tmp.path());
    assert!(dir.checkpoint_reader().unwrap().is_none());
    let mut w = dir.checkpoint_writer().unwrap();
    w.tensor("a".into(), &[&[1.0, 2.0], &[3.0, 4.0], &[5.0, 6.0]]).unwrap();
    w.tensor("b".into(), &[&[7.0], &[8.0], &[9.0]]).unwrap();
    w.finish(12, 3.5, 2.0).unwrap();
    let mut r = dir.checkpoint_reader().unwrap().unwrap();
    assert_eq!((r.state.step, r.state.wall_s), (12, 3.5));
    r.expect_tensors(2).unwrap();
    assert_eq!(r.tensor("a", 2, 3).unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(r.tensor("b", 1, 3).unwrap(), vec![7.0, 8.0, 9.0]);
    // the same file read as another model: wrong count, wrong name, wrong size
    let mut r = dir.checkpoint_reader().unwrap().unwrap();
    assert!(r.expect_tensors(3).is_err());
    assert!(r.tensor("x", 2, 3).unwrap_err().contains("does not match parameter x"));
    let mut r = dir.checkpoint_reader().unwrap().unwrap();
    assert!(r.tensor("a", 3, 3).is_err());
    // a second checkpoint replaces the first; no temporary folder is left behind
    let mut w = dir.checkpoint_writer().unwrap();
    w.tensor("a".into(), &[&[0.0, 0.0], &[0.0, 0.0], &[0.0, 0.0]]).unwrap();
    w.finish(24, 7.0, 4.0).unwrap();
    assert_eq!(dir.checkpoint_reader().unwrap().unwrap().state.step, 24);
    assert!(!tmp.path().join("checkpoint.tmp").exists() && !tmp.path().join("checkpoint.old").exists());
}

#[test]
fn run_files_round_trip_and_triage_follows_each_folders_status() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let file = switch_rundir::RunFile {
        run_id: "a".into(),
        sweep: "s".into(),
        is_baseline: true,
        point: serde_json::json!({"model.num_experts": 1, "train.seed": 0}).as_object().unwrap().clone(),
        params_total: 10,
        params_active: 10,
        flops_per_token: 20.0,
        flops_per_token_computed: 22.0,
        config: serde_json::json!({"model": {"d_ff": 8}}),
    };
    for (id, state) in [("a", Some(State::Done)), ("b", Some(State::Failed)), ("c", Some(State::Running)), ("d", None)]
    {
        let dir = RunDir::new(runs.join(id));
        dir.create(&switch_rundir::RunFile { run_id: id.into(), ..file.clone() }.yaml()).unwrap();
        if let Some(state) = state {
            dir.write_status(&Status { state, ..Default::default() }).unwrap();
        }
    }
    let read = switch_rundir::RunFile::<serde_json::Value>::read(&runs.join("a/config.yaml")).unwrap();
    assert_eq!((read.run_id.as_str(), read.point, read.config), ("a", file.point.clone(), file.config.clone()));
    let err = switch_rundir::RunFile::<serde_json::Value>::read(&runs.join("e/config.yaml")).unwrap_err();
    assert!(err.contains("e/config.yaml: cannot be read"), "{err}");

    let ids = ["a", "b", "c", "d", "new"];
    let t = switch_rundir::triage(&runs, ids, false);
    assert_eq!(
        (t.done, t.failed, t.pending),
        (vec!["a".into()], vec!["b".into()], vec!["c".into(), "d".into(), "new".into()])
    );
    let retry = switch_rundir::triage(&runs, ids, true);
    assert_eq!(retry.pending, ["b", "c", "d", "new"]);
}
