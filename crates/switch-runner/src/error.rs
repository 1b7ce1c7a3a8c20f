//! The runner's errors, typed up to the CLI: each kind says what the user can do about it, and
//! the model's and data's own typed errors pass through unchanged.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A grid, preset, run config or flag is wrong: names the file (or flag), the key and the fix.
    #[error("{}: {problem}", file.display())]
    Input { file: PathBuf, problem: String },
    /// A model setting is out of range (names the field and the allowed values).
    #[error(transparent)]
    Model(#[from] switch_model::ConfigError),
    /// The corpus or tokenizer could not be prepared.
    #[error(transparent)]
    Data(#[from] switch_data::DataError),
    /// A run stopped with an error: a non-finite loss, a checkpoint of another model.
    #[error("{0}")]
    Training(String),
    /// The results folder could not be read or written, or is in use by another sweep.
    #[error("{0}")]
    Folder(String),
    /// Slurm is missing or refused the job.
    #[error("{0}")]
    Slurm(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// dfdx could not allocate a tensor.
    #[error("tensor allocation failed ({0:?}): the machine is out of memory")]
    Device(dfdx::tensor::CpuError),
}

impl From<dfdx::tensor::CpuError> for Error {
    fn from(e: dfdx::tensor::CpuError) -> Self {
        Error::Device(e)
    }
}

impl Error {
    /// A problem with the file (or flag) `file`.
    pub fn input(file: impl Into<PathBuf>, problem: impl std::fmt::Display) -> Self {
        Error::Input { file: file.into(), problem: problem.to_string() }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
