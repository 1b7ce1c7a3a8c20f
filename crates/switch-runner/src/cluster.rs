//! The `slurm:` section of a grid file and its checks, made when the grid is planned (whatever
//! the backend), so a malformed cluster setting never waits for a submission to be found.
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

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
    days.is_none_or(num) && !rest.is_empty() && rest.split(':').count() <= 3 && rest.split(':').all(num)
}

impl SlurmConfig {
    /// The form of every value (time, mem, counts, extra lines), checked when a grid is planned,
    /// whatever the backend; errors name the file, the key and the allowed form.
    pub fn check_values(&self, grid: &Path) -> Result<()> {
        let bad = |key: &str, msg: String| Error::input(grid, format!("slurm.{key}: {msg}"));
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
    pub fn validate(&self, grid: &Path) -> Result<()> {
        self.check_values(grid)?;
        if self.require_partition && self.partition.as_deref().is_none_or(str::is_empty) {
            return Err(Error::input(
                grid,
                "slurm.partition: is required (require_partition: true): name the partition to submit to, e.g. `partition: gpu`",
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

    pub(crate) fn sbatch_lines(&self) -> Vec<String> {
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
