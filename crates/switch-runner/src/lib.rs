//! `switch-runner`: YAML grids at fixed FLOPs per token, the training loop, resumable run
//! folders and parallel sweeps.
//!
//! - [`config`]: the resolved [`config::RunConfig`] of one run and key-checked merging;
//! - [`grid`]: grid files → [`grid::Plan`] (cartesian, zip, points, exclude, seeds, FLOPs rules);
//! - [`train`]: the training loop;
//! - [`cputime`]: the CPU time of a run's own threads;
//! - [`optim`]: AdamW and Adafactor;
//! - [`probe`]: where a trained run's routers get their gradient from;
//! - [`rundir`]: the run-folder contract with the analysis crate;
//! - [`sweep`](mod@sweep): local execution with resume, failure isolation and progress;
//! - [`error`]: the typed [`Error`] every fallible function returns.
pub mod cluster;
pub mod config;
pub mod cputime;
pub mod error;
pub mod grid;
pub mod optim;
pub mod probe;
pub mod slurm;
pub mod sweep;
pub mod train;

pub use config::RunConfig;
pub use error::{Error, Result};
pub use grid::{plan, Plan};
pub use sweep::{sweep, SweepOptions};
/// The run-folder format, from its own crate (the analysis reads the same definitions).
pub use switch_rundir as rundir;
