//! Slurm settings of a grid (`slurm:` block), validated before anything is submitted.
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmConfig {
    pub partition: Option<String>,
    pub cpus_per_task: Option<u32>,
    /// e.g. `4G`.
    pub mem: Option<String>,
    /// Minutes, or `HH:MM:SS`.
    pub time: Option<String>,
    /// e.g. `gpu:1`.
    pub gres: Option<String>,
    /// Array throttle `%K`: at most K tasks at once.
    pub max_concurrent: Option<u32>,
    /// Extra `#SBATCH` lines, verbatim.
    #[serde(default)]
    pub extra: Vec<String>,
}
