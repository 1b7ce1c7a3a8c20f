//! The run folder, the one contract between the runner (which writes it) and the analysis and
//! Slurm status (which read it). A schema change here is a compile error in every reader.
//!
//! ```text
//! results/<sweep>/runs/<run_id>/
//!   config.yaml   resolved config + run_id, sweep, point, is_baseline, accounting ([`RunFile`])
//!   metrics.csv   step,tokens,wall_s,cpu_s,lr,train_loss,aux_loss,z_loss,drop_fraction,eval_loss,eval_neg_log_perplexity
//!                 (eval = the validation split; the test split is scored once, into status.json)
//!   routing.csv   step,layer,expert,load_fraction,drop_fraction,router_entropy
//!   status.json   state (running | done | failed), error, times, steps_done, params, FLOPs, final metrics
//!   checkpoint/   state.json + tensors.bin (weights, AdamW moments), replaced atomically
//! ```
pub mod claims;

use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

pub const METRICS_HEADER: &str =
    "step,tokens,wall_s,cpu_s,lr,train_loss,aux_loss,z_loss,drop_fraction,eval_loss,eval_neg_log_perplexity";
pub const ROUTING_HEADER: &str = "step,layer,expert,load_fraction,drop_fraction,router_entropy";

/// One row of `metrics.csv`; `eval_loss` (on the validation split) only at evaluations (its neg
/// log perplexity follows).
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsRow {
    pub step: u64,
    pub tokens: u64,
    pub wall_s: f64,
    /// CPU seconds of the run's own threads: what the run cost on a machine shared with others.
    pub cpu_s: f64,
    pub lr: f64,
    pub train_loss: f64,
    pub aux_loss: f64,
    pub z_loss: f64,
    pub drop_fraction: f64,
    pub eval_loss: Option<f64>,
}

impl std::fmt::Display for MetricsRow {
    /// The CSV line, without its newline, in [`METRICS_HEADER`]'s column order.
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let Self { step, tokens, wall_s, cpu_s, lr, train_loss, aux_loss, z_loss, drop_fraction, eval_loss } = self;
        write!(
            f,
            "{step},{tokens},{wall_s:.3},{cpu_s:.3},{lr:.6e},{train_loss:.6},{aux_loss:.6},{z_loss:.6},{drop_fraction:.6},"
        )?;
        match eval_loss {
            Some(l) => write!(f, "{l:.6},{:.6}", -l),
            None => write!(f, ","),
        }
    }
}

/// One row of `routing.csv`: one expert of one sparse layer at one evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingRow<'a> {
    pub step: u64,
    pub layer: &'a str,
    pub expert: usize,
    pub load_fraction: f64,
    pub drop_fraction: f64,
    pub router_entropy: f64,
}

impl std::fmt::Display for RoutingRow<'_> {
    /// The CSV line, without its newline, in [`ROUTING_HEADER`]'s column order.
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let Self { step, layer, expert, load_fraction, drop_fraction, router_entropy } = self;
        write!(f, "{step},{layer},{expert},{load_fraction:.6},{drop_fraction:.6},{router_entropy:.6}")
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Where a run is: `running` (also an interrupted run, resumable), `done` or `failed`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    #[default]
    Running,
    Done,
    Failed,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            State::Running => "running",
            State::Done => "done",
            State::Failed => "failed",
        })
    }
}

/// `status.json`, written atomically. Every field has a default, so a reader accepts a file
/// written by an older version or by hand.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Status {
    pub state: State,
    pub error: Option<String>,
    /// Unix seconds.
    pub started_at: f64,
    pub finished_at: Option<f64>,
    pub steps_done: u64,
    pub steps_total: u64,
    pub params_total: u64,
    pub params_active: u64,
    pub flops_per_token: f64,
    pub final_train_loss: Option<f64>,
    /// On the validation split (the last evaluation of `metrics.csv`).
    pub final_eval_loss: Option<f64>,
    pub final_eval_neg_log_perplexity: Option<f64>,
    /// The test split, scored once at the end of the run.
    pub final_test_loss: Option<f64>,
    pub final_test_neg_log_perplexity: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub wall_s: Option<f64>,
    /// CPU seconds of the run's own threads.
    pub cpu_s: Option<f64>,
}

impl Status {
    /// A fresh `running` status of a run with these totals, started now.
    pub fn new(steps_total: u64, params_total: u64, params_active: u64, flops_per_token: f64) -> Self {
        Self { started_at: now(), steps_total, params_total, params_active, flops_per_token, ..Default::default() }
    }
}

/// Writes through a temporary file and a rename: readers see the old or the new file, never half.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_file_name(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("file")));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// `config.yaml`: a run's resolved config `C` plus its identity and accounting. The runner
/// writes it with its typed config; the analysis reads the config part as plain YAML values.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunFile<C> {
    pub run_id: String,
    pub sweep: String,
    pub is_baseline: bool,
    /// The grid keys this point sets (seed included), in grid order.
    pub point: serde_json::Map<String, serde_json::Value>,
    pub params_total: u64,
    pub params_active: u64,
    /// The paper's convention: expert FFNs counted as one dense FFN per choice, router aside.
    pub flops_per_token: f64,
    /// What the engine computes: the router, and every expert capacity slot (filled or not).
    #[serde(default)]
    pub flops_per_token_computed: f64,
    #[serde(flatten)]
    pub config: C,
}

impl<C: Serialize + serde::de::DeserializeOwned> RunFile<C> {
    /// Reads `config.yaml`; the error names the file and what is wrong.
    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot be read ({e})", path.display()))?;
        serde_saphyr::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
    pub fn yaml(&self) -> String {
        serde_saphyr::to_string(self).expect("serializable")
    }
}

/// The `description:` of the grid a sweep ran (its copy `grid.yaml` in the sweep folder), for the
/// report to show; `None` when there is none or the file cannot be read.
pub fn grid_description(sweep_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(sweep_dir.join("grid.yaml")).ok()?;
    let grid: serde_json::Value = serde_saphyr::from_str(&text).ok()?;
    Some(grid.get("description")?.as_str()?.trim().to_string()).filter(|d| !d.is_empty())
}

/// A run folder's `status.json`, as [`RunDir::status_file`] finds it.
#[derive(Debug)]
pub enum StatusFile {
    Missing,
    Readable(Status),
    /// It cannot be read or parsed: what is wrong, naming the file.
    Damaged(String),
}

/// A sweep's runs sorted by what their folders under `runs/` say.
#[derive(Debug, Default, PartialEq)]
pub struct Triage {
    /// New, running, interrupted (resumable) or with a damaged `status.json` (resumed from the
    /// checkpoint; writing its new status sets the damaged file aside): to train.
    pub pending: Vec<String>,
    pub done: Vec<String>,
    /// Failed and not retried.
    pub failed: Vec<String>,
}

/// Sorts `run_ids` by the state recorded in `runs_dir/<id>/status.json`: done runs are skipped,
/// failed runs too unless `retry_failed`; everything else is pending.
pub fn triage<'a>(runs_dir: &Path, run_ids: impl IntoIterator<Item = &'a str>, retry_failed: bool) -> Triage {
    let mut t = Triage::default();
    for id in run_ids {
        match RunDir::new(runs_dir.join(id)).read_status().map(|s| s.state) {
            Some(State::Done) => t.done.push(id.to_string()),
            Some(State::Failed) if !retry_failed => t.failed.push(id.to_string()),
            _ => t.pending.push(id.to_string()),
        }
    }
    t
}

#[derive(Serialize, Deserialize)]
pub struct CheckpointState {
    pub step: u64,
    pub wall_s: f64,
    #[serde(default)]
    pub cpu_s: f64,
    pub params: Vec<(String, usize)>,
}

pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// `status.json`, or `None` where it is missing or damaged ([`RunDir::status_file`] tells
    /// which).
    pub fn read_status(&self) -> Option<Status> {
        match self.status_file() {
            StatusFile::Readable(s) => Some(s),
            StatusFile::Missing | StatusFile::Damaged(_) => None,
        }
    }

    /// What `status.json` holds: nothing yet (a run not started), a status, or something that
    /// cannot be read as one (the error names the file).
    pub fn status_file(&self) -> StatusFile {
        let path = self.path.join("status.json");
        match std::fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StatusFile::Missing,
            Err(e) => StatusFile::Damaged(format!("{}: cannot be read ({e})", path.display())),
            Ok(bytes) => serde_json::from_slice(&bytes).map_or_else(
                |e| StatusFile::Damaged(format!("{}: damaged ({e})", path.display())),
                StatusFile::Readable,
            ),
        }
    }

    /// Renames a damaged `status.json` to `status.json.damaged` (`.damaged.2`, `.3`, … when that
    /// name is taken), so that a new status is written without losing the old bytes.
    fn set_aside_damaged_status(&self) -> std::io::Result<()> {
        let StatusFile::Damaged(problem) = self.status_file() else { return Ok(()) };
        let from = self.path.join("status.json");
        let to = (1..)
            .map(|n| {
                self.path.join(if n == 1 { "status.json.damaged".into() } else { format!("status.json.damaged.{n}") })
            })
            .find(|p| !p.exists())
            .expect("a free name");
        std::fs::rename(&from, &to).map_err(|e| {
            std::io::Error::new(e.kind(), format!("{problem}; renaming it to {} failed ({e})", to.display()))
        })
    }

    /// Whether a damaged `status.json` of this run was ever set aside: its state before then is
    /// unknown.
    pub fn had_damaged_status(&self) -> bool {
        self.path.join("status.json.damaged").exists()
    }

    /// Rows of `metrics.csv` below its header (0 without one), counted on the raw bytes.
    pub fn logged_rows(&self) -> usize {
        std::fs::read(self.path.join("metrics.csv"))
            .map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count().saturating_sub(1))
    }

    /// When the run folder was created: `config.yaml`'s modification time (it is written once),
    /// in Unix seconds.
    pub fn created_at(&self) -> Option<f64> {
        let modified = std::fs::metadata(self.path.join("config.yaml")).ok()?.modified().ok()?;
        Some(modified.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64())
    }

    /// Writes `status.json`; a damaged one is set aside first, never written over.
    pub fn write_status(&self, s: &Status) -> std::io::Result<()> {
        self.set_aside_damaged_status()?;
        write_atomic(&self.path.join("status.json"), serde_json::to_string_pretty(s).expect("serializable").as_bytes())
    }

    /// Creates the folder and writes `config.yaml` (atomically) if it is new.
    pub fn create(&self, config_yaml: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.path)?;
        if !self.path.join("config.yaml").exists() {
            write_atomic(&self.path.join("config.yaml"), config_yaml.as_bytes())?;
        }
        Ok(())
    }

    fn appender(&self, name: &str, header: &str) -> std::io::Result<BufWriter<File>> {
        let path = self.path.join(name);
        let fresh = !path.exists() || std::fs::metadata(&path)?.len() == 0;
        let mut w = BufWriter::new(OpenOptions::new().create(true).append(true).open(path)?);
        if fresh {
            writeln!(w, "{header}")?;
            w.flush()?;
        }
        Ok(w)
    }

    pub fn metrics_writer(&self) -> std::io::Result<BufWriter<File>> {
        self.appender("metrics.csv", METRICS_HEADER)
    }

    pub fn routing_writer(&self) -> std::io::Result<BufWriter<File>> {
        self.appender("routing.csv", ROUTING_HEADER)
    }

    /// Drops log rows past `step` (written after the checkpoint we resume from) and any torn last line.
    pub fn truncate_logs(&self, step: u64) -> std::io::Result<()> {
        for (name, header) in [("metrics.csv", METRICS_HEADER), ("routing.csv", ROUTING_HEADER)] {
            let path = self.path.join(name);
            let Ok(bytes) = std::fs::read(&path) else { continue };
            let mut kept = String::new();
            // Anything a crash or a stray write left behind (a torn row, bytes that are not
            // UTF-8, rows past the checkpoint) is dropped, never fatal.
            for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
                let Ok(line) = std::str::from_utf8(line) else { continue };
                let first = line.split(',').next().unwrap_or("");
                let keep = if i == 0 {
                    line.starts_with("step,")
                } else {
                    first.parse::<u64>().is_ok_and(|s| s <= step)
                        && line.split(',').count() == header.split(',').count()
                };
                if keep {
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
            write_atomic(&path, kept.as_bytes())?;
        }
        Ok(())
    }

    /// Starts a checkpoint in `checkpoint.tmp/`; [`CheckpointWriter::finish`] swaps it in.
    pub fn checkpoint_writer(&self) -> std::io::Result<CheckpointWriter> {
        let tmp = self.path.join("checkpoint.tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        let out = BufWriter::new(File::create(tmp.join("tensors.bin"))?);
        Ok(CheckpointWriter { run: self.path.clone(), tmp, out, names: vec![] })
    }

    /// Opens the last checkpoint, if any (also one left as `checkpoint.old` by a crash between
    /// the two renames of [`CheckpointWriter::finish`]).
    pub fn checkpoint_reader(&self) -> std::io::Result<Option<CheckpointReader>> {
        let dir = [self.path.join("checkpoint"), self.path.join("checkpoint.old")]
            .into_iter()
            .find(|d| d.join("state.json").exists());
        let Some(dir) = dir else { return Ok(None) };
        let named = |path: &Path, e: &dyn std::fmt::Display| std::io::Error::other(format!("{}: {e}", path.display()));
        let state_file = dir.join("state.json");
        let text = std::fs::read(&state_file).map_err(|e| named(&state_file, &e))?;
        let state: CheckpointState = serde_json::from_slice(&text).map_err(|e| named(&state_file, &e))?;
        let file = dir.join("tensors.bin");
        let len = std::fs::metadata(&file).map_err(|e| named(&file, &e))?.len();
        let input = BufReader::new(File::open(&file).map_err(|e| named(&file, &e))?);
        Ok(Some(CheckpointReader { dir, state, input, len, at: 0, next: 0 }))
    }
}

/// Writes a checkpoint tensor by tensor (each as consecutive blocks of f32, e.g. weights then
/// AdamW's m and v), so saving needs no second copy of the model in memory.
pub struct CheckpointWriter {
    run: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    names: Vec<(String, usize)>,
}

impl CheckpointWriter {
    /// Appends tensor `name`: its blocks, all of one length.
    pub fn tensor(&mut self, name: String, blocks: &[&[f32]]) -> std::io::Result<()> {
        self.names.push((name, blocks.first().map_or(0, |b| b.len())));
        for x in blocks.iter().flat_map(|b| b.iter()) {
            self.out.write_all(&x.to_le_bytes())?;
        }
        Ok(())
    }

    /// Syncs, writes `state.json` and replaces `checkpoint/` by two renames.
    pub fn finish(self, step: u64, wall_s: f64, cpu_s: f64) -> std::io::Result<()> {
        self.out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        let state = CheckpointState { step, wall_s, cpu_s, params: self.names };
        std::fs::write(self.tmp.join("state.json"), serde_json::to_string(&state).expect("serializable"))?;
        let dst = self.run.join("checkpoint");
        let old = self.run.join("checkpoint.old");
        let _ = std::fs::remove_dir_all(&old);
        if dst.exists() {
            std::fs::rename(&dst, &old)?;
        }
        std::fs::rename(&self.tmp, &dst)?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }
}

/// Reads a checkpoint back tensor by tensor, checking names and sizes.
pub struct CheckpointReader {
    dir: PathBuf,
    pub state: CheckpointState,
    input: BufReader<File>,
    len: u64,
    at: u64,
    next: usize,
}

impl CheckpointReader {
    /// The next tensor, which must be `name` with `blocks` blocks of `n` floats each.
    pub fn tensor(&mut self, name: &str, n: usize, blocks: usize) -> Result<Vec<f32>, String> {
        let bytes_len = 4 * blocks * n;
        match self.state.params.get(self.next) {
            Some((saved, m)) if saved == name && *m == n && self.at + bytes_len as u64 <= self.len => {}
            _ => return Err(format!("checkpoint in {} does not match parameter {name}", self.dir.display())),
        }
        let mut bytes = vec![0u8; bytes_len];
        self.input.read_exact(&mut bytes).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        (self.at, self.next) = (self.at + bytes_len as u64, self.next + 1);
        Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    /// Checks that the checkpoint holds exactly `count` tensors.
    pub fn expect_tensors(&self, count: usize) -> Result<(), String> {
        if self.state.params.len() == count {
            Ok(())
        } else {
            Err(format!("checkpoint in {} does not match this config's model", self.dir.display()))
        }
    }
}
