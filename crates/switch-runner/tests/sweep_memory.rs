//! A sweep trains many runs in one process: each finished run must give its memory back. dfdx's
//! buffer cache never frees what it holds, so a run that did not empty it at the end kept all its
//! buffers (a 22-run sweep grew to 24 GB and was killed). Alone in its test binary, so the
//! process's memory is the runs'.
use std::sync::atomic::AtomicBool;
use switch_runner::rundir::RunDir;

fn resident_bytes() -> u64 {
    switch_model::procfs::resident_bytes()
}

#[cfg(target_os = "linux")] // reads /proc/self/status
#[test]
fn runs_trained_one_after_another_give_their_memory_back() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = switch_data::corpus::write_excerpt(&tmp.path().join("corpus"), 200_000).unwrap();
    let grid = tmp.path().join("m.yaml");
    std::fs::write(&grid, format!(
        "name: m\nsettings:\n  model: {{ d_model: 64, d_ff: 1024, num_heads: 2, d_kv: 16, num_encoder_layers: 2, num_decoder_layers: 1, num_experts: 4, expert_every: 1 }}\n  data: {{ corpus: {}, tokenizer: byte, encoder_len: 32, eval_examples: 16 }}\n  train: {{ steps: 3, batch_size: 8, eval_every: 3, checkpoint_every: 3, eval_batch_size: 8 }}\n",
        corpus.display()
    )).unwrap();
    let plan = switch_runner::plan(&grid).unwrap();
    let cfg = &plan.runs[0].config;
    let data = switch_runner::sweep::datasets(&[&cfg.data], tmp.path()).unwrap();
    let ds = data.values().next().unwrap();
    let run = |i: usize| {
        let dir = RunDir::new(tmp.path().join(format!("run{i}")));
        dir.create("").unwrap();
        switch_runner::train::train(cfg, ds, &dir, &AtomicBool::new(false), &|_, _, _| {}).unwrap();
    };
    run(0);
    run(1);
    let before = resident_bytes();
    for i in 2..8 {
        run(i);
    }
    let grown = resident_bytes().saturating_sub(before);
    // Without emptying the cache, each run keeps what it allocated: about 27 MiB here (163 MiB over 6 runs, measured).
    assert!(grown < 48 << 20, "resident memory grew by {} MiB over 6 runs", grown >> 20);
}
