//! The Slurm backend: one `sbatch` array job per submission, one task per pending run, each task
//! running `switchlab train <run>/config.yaml` in the shared results folder. Run folders are
//! independent, so no coordination is needed beyond the run-folder contract.
use crate::grid::Plan;
use crate::rundir::{write_atomic, RunDir};
use crate::sweep::{pending_runs, RunFile, SweepSummary};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The `slurm:` block of a grid.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmConfig {
    pub partition: Option<String>,
    pub cpus_per_task: Option<u32>,
    /// e.g. `4G`.
    pub mem: Option<String>,
    /// Minutes, `MM:SS`, `HH:MM:SS` or `D-HH:MM:SS`.
    pub time: Option<String>,
    /// e.g. `gpu:1`.
    pub gres: Option<String>,
    /// Array throttle `%K`: at most K tasks at once.
    pub max_concurrent: Option<u32>,
    /// Refuse to submit without `partition` (for clusters with no default partition).
    #[serde(default)]
    pub require_partition: bool,
    /// Extra `#SBATCH` lines, verbatim (e.g. `--account=ml`).
    #[serde(default)]
    pub extra: Vec<String>,
}

fn time_ok(t: &str) -> bool {
    if ["infinite", "unlimited"].contains(&t.to_ascii_lowercase().as_str()) {
        return true;
    }
    let (days, rest) = match t.split_once('-') {
        Some((d, r)) => (Some(d), r),
        None => (None, t),
    };
    let num = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    days.map_or(true, num) && !rest.is_empty() && rest.split(':').count() <= 3 && rest.split(':').all(num)
}

impl SlurmConfig {
    /// The form of every value (time, mem, counts, extra lines), checked when a grid is planned,
    /// whatever the backend; errors name the file, the key and the allowed form.
    pub fn check_values(&self, grid: &Path) -> anyhow::Result<()> {
        let bad = |key: &str, msg: String| anyhow::anyhow!("{}: slurm.{key}: {msg}", grid.display());
        if let Some(t) = &self.time {
            if !time_ok(t) {
                return Err(bad(
                    "time",
                    format!("`{t}` is not a Slurm time limit: use minutes (`30`), `MM:SS`, `HH:MM:SS`, `D-HH:MM:SS` or `UNLIMITED`, with no sign"),
                ));
            }
        }
        if self.cpus_per_task == Some(0) {
            return Err(bad("cpus_per_task", "= 0: use at least 1".into()));
        }
        if self.max_concurrent == Some(0) {
            return Err(bad("max_concurrent", "= 0: use at least 1, or leave it out".into()));
        }
        if let Some(m) = &self.mem {
            if self.mem_bytes().is_none() {
                return Err(bad("mem", format!("`{m}` is not a Slurm memory size: use a whole number with an optional K, M, G or T suffix (no suffix = megabytes), e.g. `4G` or `4000M`")));
            }
        }
        for line in &self.extra {
            if !line.starts_with("--") || line.contains('\n') {
                return Err(bad("extra", format!("`{line}` must be one sbatch option starting with `--`")));
            }
        }
        Ok(())
    }

    /// Checks every setting before anything is submitted: [`Self::check_values`], and a
    /// partition when `require_partition` is set.
    pub fn validate(&self, grid: &Path) -> anyhow::Result<()> {
        self.check_values(grid)?;
        if self.require_partition && self.partition.as_deref().map_or(true, str::is_empty) {
            return Err(anyhow::anyhow!(
                "{}: slurm.partition: is required (require_partition: true): name the partition to submit to, e.g. `partition: gpu`",
                grid.display()
            ));
        }
        Ok(())
    }

    /// `mem` in bytes, as Slurm reads it: digits and an optional K, M, G or T (default M).
    pub fn mem_bytes(&self) -> Option<f64> {
        let m = self.mem.as_deref()?.trim();
        let (digits, unit) = match m.strip_suffix(['K', 'M', 'G', 'T']) {
            Some(d) => (d, &m[d.len()..]),
            None => (m, "M"),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let power = "KMGT".find(unit).expect("one of KMGT") as i32 + 1;
        Some(digits.parse::<f64>().ok()? * 1024f64.powi(power))
    }

    fn sbatch_lines(&self) -> Vec<String> {
        let mut v = Vec::new();
        let mut opt = |k: &str, val: Option<String>| {
            if let Some(val) = val {
                v.push(format!("#SBATCH --{k}={val}"));
            }
        };
        opt("partition", self.partition.clone());
        opt("cpus-per-task", self.cpus_per_task.map(|c| c.to_string()));
        opt("mem", self.mem.clone());
        opt("time", self.time.clone());
        opt("gres", self.gres.clone());
        v.extend(self.extra.iter().map(|e| format!("#SBATCH {e}")));
        v
    }
}

/// What a submission prepared (and, unless a dry run, submitted).
pub struct Submission {
    pub script: PathBuf,
    pub command: String,
    pub job_id: Option<String>,
    pub tasks: usize,
    pub summary: SweepSummary,
}

/// Creates the pending runs' folders, writes the array script and submits it with `sbatch --parsable`.
pub fn submit(plan: &Plan, results_root: &Path, retry_failed: bool, dry_run: bool) -> anyhow::Result<Submission> {
    let cfg = plan.slurm.clone().unwrap_or_default();
    cfg.validate(&plan.path)?;
    let sweep_dir = results_root.join(&plan.name);
    std::fs::create_dir_all(sweep_dir.join("slurm")).map_err(|e| {
        anyhow::anyhow!("cannot create {} ({e}): choose a writable --results folder", sweep_dir.display())
    })?;
    let sweep_dir = std::fs::canonicalize(&sweep_dir)?;
    let mut summary = SweepSummary::default();
    let pending = pending_runs(plan, &sweep_dir, retry_failed, &mut summary);
    let mut configs = String::new();
    for r in &pending {
        let dir = RunDir::new(sweep_dir.join("runs").join(&r.run_id));
        dir.create(&RunFile::new(plan, r).yaml())?;
        configs.push_str(&format!("{}\n", dir.path.join("config.yaml").display()));
    }
    if let Ok(grid) = std::fs::read(&plan.path) {
        write_atomic(&sweep_dir.join("grid.yaml"), &grid)?;
    }
    write_atomic(&sweep_dir.join("plan.csv"), plan.table(true).as_bytes())?;
    let list = sweep_dir.join("slurm/pending.txt");
    write_atomic(&list, configs.as_bytes())?;
    let exe = std::env::current_exe()?;
    let throttle = cfg.max_concurrent.map(|k| format!("%{k}")).unwrap_or_default();
    let mut script = format!(
        "#!/bin/bash\n# Written by switchlab for sweep `{}`: task i trains line i+1 of pending.txt.\n#SBATCH --job-name=switchlab-{}\n#SBATCH --array=0-{}{throttle}\n#SBATCH --output={}/slurm/%A_%a.out\n#SBATCH --signal=B:TERM@60\n",
        plan.name,
        plan.name,
        pending.len().saturating_sub(1),
        sweep_dir.display()
    );
    for l in cfg.sbatch_lines() {
        script.push_str(&l);
        script.push('\n');
    }
    script.push_str(&format!(
        "set -euo pipefail\nCONFIG=$(sed -n \"$((SLURM_ARRAY_TASK_ID + 1))p\" {list})\n{} train \"$CONFIG\" >> \"$(dirname \"$CONFIG\")/slurm.log\" 2>&1 &\nPID=$!\n# Slurm signals this shell (B:TERM) 60 s before a time limit or on preemption: pass it on, so\n# switchlab checkpoints and stops; resubmitting the sweep resumes the run.\ntrap 'kill -TERM $PID; wait $PID' TERM\nwait $PID\n",
        exe.display(),
        list = list.display()
    ));
    let path = sweep_dir.join("slurm/sweep.sbatch");
    write_atomic(&path, script.as_bytes())?;
    let command = format!("sbatch --parsable {}", path.display());
    if pending.is_empty() || dry_run {
        return Ok(Submission { script: path, command, job_id: None, tasks: pending.len(), summary });
    }
    let out = Command::new("sbatch").arg("--parsable").arg(&path).output().map_err(|e| {
        anyhow::anyhow!("cannot run sbatch ({e}): is Slurm installed here? Use --dry-run to only write the script")
    })?;
    anyhow::ensure!(out.status.success(), "sbatch refused the job: {}", String::from_utf8_lossy(&out.stderr).trim());
    let job_id = String::from_utf8_lossy(&out.stdout).trim().split(';').next().unwrap_or("").to_string();
    let jobs = sweep_dir.join("slurm/jobs.txt");
    let mut all = std::fs::read_to_string(&jobs).unwrap_or_default();
    all.push_str(&format!("{job_id}\n"));
    write_atomic(&jobs, all.as_bytes())?;
    Ok(Submission { script: path, command, job_id: Some(job_id), tasks: pending.len(), summary })
}

/// Job ids submitted for a sweep folder.
pub fn job_ids(sweep_dir: &Path) -> Vec<String> {
    std::fs::read_to_string(sweep_dir.join("slurm/jobs.txt"))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// Slurm's view of the sweep's jobs: array task id → state, for tasks still known to squeue.
pub fn queue(sweep_dir: &Path) -> Vec<(String, String)> {
    let ids = job_ids(sweep_dir);
    if ids.is_empty() {
        return vec![];
    }
    let out = Command::new("squeue").args(["-h", "-r", "-o", "%i %T", "-j", &ids.join(",")]).output();
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
            .collect()
    })
    .unwrap_or_default()
}

/// Blocks until none of the sweep's jobs is queued or running.
pub fn wait(sweep_dir: &Path, poll: std::time::Duration) {
    while !queue(sweep_dir).is_empty() {
        std::thread::sleep(poll);
    }
}

/// One line per run: run id, state from status.json (or `queued`), steps, and Slurm's view.
pub fn status_table(sweep_dir: &Path) -> anyhow::Result<String> {
    let pending = std::fs::read_to_string(sweep_dir.join("slurm/pending.txt")).unwrap_or_default();
    let queue = queue(sweep_dir);
    let jobs = job_ids(sweep_dir);
    let mut out = format!("{:<14} {:<10} {:>12} {}\n", "run", "state", "steps", "slurm");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(sweep_dir.join("runs"))
        .map_err(|e| anyhow::anyhow!("{}: no runs folder ({e})", sweep_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    dirs.sort();
    for dir in dirs {
        let id = dir.file_name().unwrap_or_default().to_string_lossy().to_string();
        let status = RunDir::new(&dir).read_status();
        let (state, steps) = match &status {
            Some(s) => (s.state.clone(), format!("{}/{}", s.steps_done, s.steps_total)),
            None => ("queued".into(), "-".into()),
        };
        // The task index of this run in the last submission, and Slurm's state of that task.
        let task = pending.lines().position(|l| l.contains(&id));
        let slurm = match (task, jobs.last()) {
            (Some(t), Some(job)) => queue
                .iter()
                .find(|(jid, _)| jid == &format!("{job}_{t}"))
                .map(|(jid, st)| format!("{jid} {st}"))
                .unwrap_or_else(|| format!("{job}_{t} finished")),
            _ => "-".into(),
        };
        out.push_str(&format!("{id:<14} {state:<10} {steps:>12} {slurm}\n"));
    }
    Ok(out)
}
