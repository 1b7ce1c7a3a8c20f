"""The PyTorch side of `switch-bench engine` and `switch-bench pytorch`: trains HF transformers'
T5 (one expert) or Switch Transformer on random tokens of the given shape and prints one line of
JSON, `{"tokens_per_s": ..., "step_s": ...}` (`PytorchRun` in crates/switch-bench/src/child.rs);
with `--matmul --threads N`, times PyTorch's f32 matmul at 1024³ as the engine benchmark times
gemm's and prints `{"flops_per_s": ...}` (`PytorchMatmul`).

Run by switch-bench, which passes the engine's comparison shape and measures switchlab's engine
on the same shape in the same run. Needs torch and transformers:
    python3 -m venv .venv-torch && .venv-torch/bin/pip install torch transformers
"""
import argparse
import json
import sys
import time

import torch


def matmul_flops_per_s(threads):
    """f32 matmul FLOP/s at 1024³: a warm-up product, then five timed (switch-bench's recipe)."""
    torch.set_num_threads(threads)
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * n ** 3 / (time.perf_counter() - start)


if "--matmul" in sys.argv:
    mp = argparse.ArgumentParser()
    mp.add_argument("--matmul", action="store_true")
    mp.add_argument("--threads", type=int, required=True)
    print(json.dumps({"flops_per_s": matmul_flops_per_s(mp.parse_args().threads)}))
    sys.exit(0)

from transformers import (SwitchTransformersConfig, SwitchTransformersForConditionalGeneration,
                          T5Config, T5ForConditionalGeneration)

p = argparse.ArgumentParser()
for name in ["experts", "threads", "steps", "vocab", "encoder-len", "decoder-len", "batch", "d-model",
             "d-ff", "d-kv", "heads", "layers"]:
    p.add_argument("--" + name, type=int, required=True)
p.add_argument("--capacity-factor", type=float, required=True)
a = p.parse_args()

torch.set_num_threads(a.threads)
torch.manual_seed(0)
shape = dict(vocab_size=a.vocab, d_model=a.d_model, d_ff=a.d_ff, d_kv=a.d_kv, num_heads=a.heads,
             num_layers=a.layers, num_decoder_layers=a.layers, dropout_rate=0.0,
             decoder_start_token_id=0)
if a.experts == 1:
    model = T5ForConditionalGeneration(T5Config(**shape, feed_forward_proj="relu"))
else:
    # HF counts capacity per sequence, in tokens: the encoder's share at this capacity factor.
    capacity = max(1, round(a.capacity_factor * a.encoder_len / a.experts))
    model = SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(
        **shape, num_experts=a.experts, expert_capacity=capacity, num_sparse_encoder_layers=a.layers,
        num_sparse_decoder_layers=a.layers, router_z_loss_coef=0.0, router_aux_loss_coef=0.01))
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.999), weight_decay=0.0)
gen = torch.Generator().manual_seed(0)


def step():
    ids = torch.randint(0, a.vocab, (a.batch, a.encoder_len), generator=gen)
    labels = torch.randint(0, a.vocab, (a.batch, a.decoder_len), generator=gen)
    kwargs = {} if a.experts == 1 else {"output_router_logits": True}
    loss = model(input_ids=ids, labels=labels, **kwargs).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


step()  # the first step allocates the optimizer's moments, as switch-bench's engine runs do
start = time.perf_counter()
for _ in range(a.steps):
    step()
secs = time.perf_counter() - start
print(json.dumps({"tokens_per_s": a.batch * (a.encoder_len + a.decoder_len) * a.steps / secs,
                  "step_s": secs / a.steps}))
