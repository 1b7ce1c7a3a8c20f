//! The Slurm backend: one `sbatch` array job per submission, one task per pending run, each task
//! running `switchlab train <run>/config.yaml` in the shared results folder. Run folders are
//! independent, so no coordination is needed beyond the run-folder contract.
pub use crate::cluster::SlurmConfig;
use crate::error::{Error, Result};
use crate::grid::Plan;
use crate::rundir::{write_atomic, RunDir, StatusFile, Triage};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What a submission prepared (and, unless a dry run, submitted).
pub struct Submission {
    pub script: PathBuf,
    pub command: String,
    pub job_id: Option<String>,
    pub tasks: usize,
    /// The plan's runs by state: `pending` were submitted.
    pub triage: Triage,
}

/// Refuses a real submission where there is no `sbatch`: called before anything is written (the
/// token cache included), so a refused submission leaves nothing behind.
pub fn check_sbatch(dry_run: bool) -> Result<()> {
    if !dry_run && !on_path("sbatch") {
        return Err(Error::Slurm(
            "no `sbatch` on PATH: is Slurm installed here? Use --dry-run to only write the script".into(),
        ));
    }
    Ok(())
}

/// Whether an executable file `name` is in a folder of `$PATH`.
fn on_path(name: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .any(|f| std::fs::metadata(f).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// Creates the pending runs' folders, writes the array script and submits it with `sbatch --parsable`.
pub fn submit(plan: &Plan, results_root: &Path, retry_failed: bool, dry_run: bool) -> Result<Submission> {
    let cfg = plan.slurm.clone().unwrap_or_default();
    cfg.validate(&plan.path)?;
    check_sbatch(dry_run)?;
    let sweep_dir = results_root.join(&plan.name);
    std::fs::create_dir_all(sweep_dir.join("slurm")).map_err(|e| {
        Error::Folder(format!("cannot create {} ({e}): choose a writable --results folder", sweep_dir.display()))
    })?;
    let sweep_dir = std::fs::canonicalize(&sweep_dir)?;
    let (pending, triage) = plan.pending(&sweep_dir, retry_failed);
    let mut configs = String::new();
    for r in &pending {
        let dir = RunDir::new(sweep_dir.join("runs").join(&r.run_id));
        dir.create(&plan.run_file(r).yaml())?;
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
        return Ok(Submission { script: path, command, job_id: None, tasks: pending.len(), triage });
    }
    let out = Command::new("sbatch").arg("--parsable").arg(&path).output().map_err(|e| {
        Error::Slurm(format!(
            "cannot run sbatch ({e}): is Slurm installed here? Use --dry-run to only write the script"
        ))
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(Error::Slurm(format!("sbatch refused the job: {}", stderr.trim())));
    }
    let job_id = String::from_utf8_lossy(&out.stdout).trim().split(';').next().unwrap_or("").to_string();
    let jobs = sweep_dir.join("slurm/jobs.txt");
    let mut all = std::fs::read_to_string(&jobs).unwrap_or_default();
    all.push_str(&format!("{job_id}\n"));
    write_atomic(&jobs, all.as_bytes())?;
    Ok(Submission { script: path, command, job_id: Some(job_id), tasks: pending.len(), triage })
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
pub fn status_table(sweep_dir: &Path) -> Result<String> {
    let pending = std::fs::read_to_string(sweep_dir.join("slurm/pending.txt")).unwrap_or_default();
    let queue = queue(sweep_dir);
    let jobs = job_ids(sweep_dir);
    let mut out = format!("{:<14} {:<10} {:>12} {}\n", "run", "state", "steps", "slurm");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(sweep_dir.join("runs"))
        .map_err(|e| Error::Folder(format!("{}: no runs folder ({e}): is this a sweep folder?", sweep_dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    dirs.sort();
    for dir in dirs {
        let id = dir.file_name().unwrap_or_default().to_string_lossy().to_string();
        let (state, steps) = match RunDir::new(&dir).status_file() {
            StatusFile::Readable(s) => (s.state.to_string(), format!("{}/{}", s.steps_done, s.steps_total)),
            StatusFile::Missing => ("queued".into(), "-".into()),
            // Its next task resumes it from the checkpoint and sets the damaged file aside.
            StatusFile::Damaged(_) => ("damaged".into(), "-".into()),
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
