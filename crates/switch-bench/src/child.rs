//! What a child process of the harness reports to its parent: one line of JSON on its stdout, of
//! one of the types here. `switch-bench engine-run` and `engine-pairs` write theirs with `emit`;
//! `bench/pytorch_engine.py` writes a `PytorchRun` or `PytorchMatmul` with `json.dumps`; the parent reads each back
//! with `parse`.
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// One measured training run (`switch-bench engine-run`, its own process, so its peak memory and
/// CPU times are its own).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    pub tokens_per_s: f64,
    pub step_s: f64,
    pub sys_over_user: f64,
    /// Peak resident memory of the process, and its resident memory before the model was built
    /// (binary, corpus, token ids, batches).
    pub peak_rss: u64,
    pub base_rss: u64,
    pub params: u64,
    pub flops_per_token: f64,
    /// Seconds and FLOPs a step spent in the parameter products
    /// ([`switch_model::kernels::product_clock`]; zero under the plain dfdx ops).
    pub product_s: f64,
    pub product_flops: f64,
}

/// Switch ÷ dense step-time ratios, one per pair of interleaved steps (`switch-bench engine-pairs`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairRatios {
    pub ratios: Vec<f64>,
}

/// One PyTorch run of `bench/pytorch_engine.py`: `{"tokens_per_s": …, "step_s": …}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PytorchRun {
    pub tokens_per_s: f64,
    pub step_s: f64,
}

/// PyTorch's f32 matmul (`bench/pytorch_engine.py --matmul`): `{"flops_per_s": …}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PytorchMatmul {
    pub flops_per_s: f64,
}

/// Prints `report` as the child's one line of JSON.
pub fn emit<T: Serialize>(report: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(report)?);
    Ok(())
}

/// The report in a child's output: the last line of its stdout that is a `T` in JSON. Without
/// one, an error that starts with `what` and quotes everything the child printed.
pub fn parse<T: DeserializeOwned>(what: &str, out: &std::process::Output) -> anyhow::Result<T> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout.lines().rev().find_map(|l| serde_json::from_str(l.trim()).ok()).ok_or_else(|| {
        anyhow::anyhow!("{what} failed ({}): {stdout}{}", out.status, String::from_utf8_lossy(&out.stderr))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn output(stdout: &str) -> std::process::Output {
        std::process::Output {
            status: std::process::ExitStatus::from_raw(0),
            stdout: stdout.as_bytes().to_vec(),
            stderr: b"a warning\n".to_vec(),
        }
    }

    #[test]
    fn reports_round_trip_through_one_line_of_json() {
        let m = Measured {
            tokens_per_s: 12345.678,
            step_s: 0.1 + 0.2,
            sys_over_user: 1e-9,
            peak_rss: u64::MAX >> 11,
            base_rss: 123 << 20,
            params: 67_890_123,
            flops_per_token: 1.5e8,
            product_s: 0.07,
            product_flops: 2.5e10,
        };
        let line = serde_json::to_string(&m).unwrap();
        assert!(!line.contains('\n'));
        let back: Measured = parse("run", &output(&format!("something else\n{line}\n"))).unwrap();
        assert_eq!(back, m, "every figure to the last bit");
        let pairs = PairRatios { ratios: vec![1.07, 0.98, 1.25] };
        let back: PairRatios = parse("pairs", &output(&serde_json::to_string(&pairs).unwrap())).unwrap();
        assert_eq!(back, pairs);
    }

    #[test]
    fn the_python_sides_line_is_a_pytorch_run() {
        // What `print(json.dumps({...}))` writes in bench/pytorch_engine.py.
        let r: PytorchRun = parse("PyTorch run", &output("{\"tokens_per_s\": 9000.5, \"step_s\": 0.455}\n")).unwrap();
        assert_eq!(r, PytorchRun { tokens_per_s: 9000.5, step_s: 0.455 });
        let m: PytorchMatmul = parse("PyTorch matmul", &output("{\"flops_per_s\": 236800564149.87}\n")).unwrap();
        assert_eq!(m, PytorchMatmul { flops_per_s: 236800564149.87 });
    }

    #[test]
    fn a_child_without_a_report_is_an_error_that_quotes_its_output() {
        let err = parse::<Measured>("benchmark run", &output("RESULT 1 2 3\n")).unwrap_err().to_string();
        assert!(
            err.starts_with("benchmark run failed") && err.contains("RESULT 1 2 3") && err.contains("a warning"),
            "{err}"
        );
        let err = parse::<PairRatios>("pairs", &output("{\"tokens_per_s\": 1, \"step_s\": 2}")).unwrap_err();
        assert!(err.to_string().contains("pairs failed"), "a report of another type is not one: {err}");
    }
}
