# switchlab tasks; `cargo install just --locked` (or `pip install rust-just`) to use them.

# Train a grid (experiments/NAME.yaml) and write its report to results/NAME/report.
sweep NAME *ARGS:
    cargo run --release -q -p switchlab -- sweep experiments/{{NAME}}.yaml {{ARGS}}
    cargo run --release -q -p switchlab -- report results/{{NAME}}

# Write the report of results/NAME (works on a running or partly failed sweep).
report NAME:
    cargo run --release -q -p switchlab -- report results/{{NAME}}

# Print the expanded grid with parameters and FLOPs per token; trains nothing.
plan NAME:
    cargo run --release -q -p switchlab -- plan experiments/{{NAME}}.yaml

test:
    cargo test --workspace

# Speed figures: Switch ÷ dense layer, sweep parallelism, data pipeline, report, training engine,
# optimizer passes, the dense products alone.
bench:
    cargo bench -p switch-model --bench switch_layer
    cargo run --release -q -p switch-bench -- sweep
    cargo run --release -q -p switch-bench -- data
    cargo run --release -q -p switch-bench -- report
    cargo run --release -q -p switch-bench -- engine
    cargo run --release -q -p switch-bench -- optimizer
    cargo run --release -q -p switch-bench -- products

# switchlab's engine against PyTorch (HF transformers' T5 and Switch Transformer) on the engine
# benchmark's shape; installs torch and transformers into .venv-torch on first use (~6 GB).
bench-pytorch:
    test -x .venv-torch/bin/python || (python3 -m venv .venv-torch && .venv-torch/bin/pip install -q torch transformers)
    cargo run --release -q -p switch-bench -- pytorch --python .venv-torch/bin/python

# Delete results/NAME (runs, checkpoints and report).
clean NAME:
    rm -rf results/{{NAME}}
