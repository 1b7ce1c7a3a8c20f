//! `switchlab bench …`: speed figures measured side by side in one process.
use clap::Subcommand;

#[derive(Subcommand)]
pub enum Bench {
    /// Training tokens/s of one run per step for each preset point (placeholder until measured).
    Steps,
}

pub fn run(what: Bench) -> anyhow::Result<()> {
    match what {
        Bench::Steps => Ok(()),
    }
}
