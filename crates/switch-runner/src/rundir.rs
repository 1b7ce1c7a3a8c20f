//! The run directory, the contract with the analysis crate:
//!
//! ```text
//! results/<sweep>/runs/<run_id>/
//!   config.yaml   resolved config + run_id, sweep, point, is_baseline, accounting
//!   metrics.csv   step,tokens,wall_s,lr,train_loss,aux_loss,z_loss,drop_fraction,eval_loss,eval_neg_log_perplexity
//!   routing.csv   step,layer,expert,load_fraction,drop_fraction,router_entropy
//!   status.json   state (running | done | failed), error, times, steps_done, params, FLOPs, final metrics
//!   checkpoint/   state.json + tensors.bin (weights, AdamW moments), replaced atomically
//! ```
use crate::config::RunConfig;
use crate::train::{AdamW, Dev};
use dfdx::prelude::*;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use switch_model::SwitchTransformer;

pub const METRICS_HEADER: &str =
    "step,tokens,wall_s,lr,train_loss,aux_loss,z_loss,drop_fraction,eval_loss,eval_neg_log_perplexity";
pub const ROUTING_HEADER: &str = "step,layer,expert,load_fraction,drop_fraction,router_entropy";

/// Seconds since the Unix epoch.
pub fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub state: String,
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
    pub final_eval_loss: Option<f64>,
    pub final_eval_neg_log_perplexity: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub wall_s: Option<f64>,
}

impl Status {
    pub fn new(cfg: &RunConfig) -> Self {
        let a = cfg.accounting();
        Self {
            state: "running".into(),
            error: None,
            started_at: now(),
            finished_at: None,
            steps_done: 0,
            steps_total: cfg.train.steps,
            params_total: a.params_total,
            params_active: a.params_active,
            flops_per_token: a.flops_per_token,
            final_train_loss: None,
            final_eval_loss: None,
            final_eval_neg_log_perplexity: None,
            tokens_per_s: None,
            wall_s: None,
        }
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

#[derive(Serialize, Deserialize)]
pub struct CheckpointState {
    pub step: u64,
    pub wall_s: f64,
    pub params: Vec<(String, usize)>,
}

pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn read_status(&self) -> Option<Status> {
        serde_json::from_slice(&std::fs::read(self.path.join("status.json")).ok()?).ok()
    }

    pub fn write_status(&self, s: &Status) -> std::io::Result<()> {
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
            let Ok(f) = File::open(&path) else { continue };
            let mut kept = String::new();
            for (i, line) in BufReader::new(f).lines().enumerate() {
                let line = line?;
                let first = line.split(',').next().unwrap_or("");
                let keep = if i == 0 {
                    line.starts_with("step,")
                } else {
                    first.parse::<u64>().is_ok_and(|s| s <= step)
                        && line.split(',').count() == header.split(',').count()
                };
                if keep {
                    kept.push_str(&line);
                    kept.push('\n');
                }
            }
            write_atomic(&path, kept.as_bytes())?;
        }
        Ok(())
    }

    /// Writes weights and optimizer moments to `checkpoint/` via a temporary folder and renames.
    /// Streamed parameter by parameter, so saving needs no second copy of the model in memory.
    pub fn save_checkpoint(
        &self,
        model: &mut SwitchTransformer<Dev>,
        opt: &AdamW,
        step: u64,
        wall_s: f64,
    ) -> std::io::Result<()> {
        let tmp = self.path.join("checkpoint.tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        let mut names = Vec::new();
        let mut out = BufWriter::new(File::create(tmp.join("tensors.bin"))?);
        for (i, (name, p)) in model.params_mut().into_iter().enumerate() {
            let v = p.as_vec();
            names.push((name, v.len()));
            for x in v.iter().chain(&opt.m[i]).chain(&opt.v[i]) {
                out.write_all(&x.to_le_bytes())?;
            }
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        let state = CheckpointState { step, wall_s, params: names };
        std::fs::write(tmp.join("state.json"), serde_json::to_string(&state).expect("serializable"))?;
        let dst = self.path.join("checkpoint");
        let old = self.path.join("checkpoint.old");
        let _ = std::fs::remove_dir_all(&old);
        if dst.exists() {
            std::fs::rename(&dst, &old)?;
        }
        std::fs::rename(&tmp, &dst)?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// Restores weights and optimizer state if a checkpoint exists (also one left as `checkpoint.old`
    /// by a crash between the two renames).
    pub fn load_checkpoint(
        &self,
        model: &mut SwitchTransformer<Dev>,
        opt: &mut AdamW,
    ) -> anyhow::Result<Option<CheckpointState>> {
        let dir = [self.path.join("checkpoint"), self.path.join("checkpoint.old")]
            .into_iter()
            .find(|d| d.join("state.json").exists());
        let Some(dir) = dir else { return Ok(None) };
        let state: CheckpointState = serde_json::from_slice(&std::fs::read(dir.join("state.json"))?)?;
        let file = dir.join("tensors.bin");
        let len = std::fs::metadata(&file)?.len();
        let mut input = BufReader::new(File::open(&file)?);
        let mut params = model.params_mut();
        anyhow::ensure!(
            params.len() == state.params.len(),
            "checkpoint in {} does not match this config's model",
            dir.display()
        );
        let mut at = 0u64;
        for (i, ((name, p), (saved, n))) in params.iter_mut().zip(&state.params).enumerate() {
            anyhow::ensure!(
                name == saved && p.shape().0 == *n && at + 12 * *n as u64 <= len,
                "checkpoint in {} does not match parameter {name}",
                dir.display()
            );
            // One parameter at a time: weights, then m, then v.
            let mut bytes = vec![0u8; 12 * n];
            input.read_exact(&mut bytes)?;
            let floats: Vec<f32> =
                bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            p.copy_from(&floats[..*n]);
            opt.m[i].copy_from_slice(&floats[*n..2 * n]);
            opt.v[i].copy_from_slice(&floats[2 * n..]);
            at += 12 * *n as u64;
        }
        Ok(Some(state))
    }
}
