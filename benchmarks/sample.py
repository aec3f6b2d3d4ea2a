"""`sample` workload (BENCHMARKS.md): 32 prompts of 32 random token ids, exactly 128 new
tokens each (no EOS), temperature 1.0, KV cache. Figure: generated tokens/s, against HF
transformers' `generate` with its KV cache on the same weights, the two timed in alternation in this
process.

    python -m benchmarks.sample                       # bench-small and bench-medium
    python -m benchmarks.sample --models=bench-small --no-hf

`matmul_peak_gflops` doubles as a load gauge: on a shared machine it drops in proportion to
the cores other processes hold (on the 2-core box ~180 idle, ~90 with one core taken). XLA
and PyTorch suffer differently from contention (PyTorch's spinning threads far more), so
`speedup_vs_hf` means something only from a run whose peak is the idle one.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from flax import nnx

from benchmarks._common import (
    compile_seconds,
    emit,
    hf_twin,
    interleaved_median_seconds,
    matmul_peak_flops,
)
from deltal_jax import hostmem
from deltal_jax.models import get_preset, init_model
from deltal_jax.sampling import SamplingConfig, generate_split


def run(name: str, *, batch: int, prompt_len: int, new_tokens: int, repeats: int, hf: bool):
    cfg = get_preset(name)
    model = init_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
    mask = np.ones_like(prompts, bool)
    config = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0)
    key = jax.random.key(0)

    graphdef, state = nnx.split(model)
    compiled, compile_s = compile_seconds(
        generate_split, graphdef, state, prompts, mask, key, config
    )
    fns = {"jax": lambda: compiled(state, prompts, mask, key)}
    if hf and (twin := hf_twin(model)) is not None:
        import torch

        inputs = torch.tensor(prompts, dtype=torch.long)

        def hf_generate():
            with torch.no_grad():
                return twin.generate(
                    inputs,
                    attention_mask=torch.ones_like(inputs),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    pad_token_id=0,
                )

        fns["hf"] = hf_generate
    seconds = interleaved_median_seconds(fns, repeats=repeats)
    tokens = batch * new_tokens
    peak = matmul_peak_flops()
    result = {
        "workload": "sample",
        "model": name,
        "params": cfg.num_params(),
        "batch": batch,
        "new_tokens": new_tokens,
        "tokens_per_s": tokens / seconds["jax"],
        "seconds": seconds["jax"],
        "compile_s": compile_s,
        "matmul_peak_gflops": peak / 1e9,
        "mfu": 2 * cfg.num_params() * tokens / seconds["jax"] / peak,
    }
    if "hf" in seconds:
        result |= {
            "hf_tokens_per_s": tokens / seconds["hf"],
            "speedup_vs_hf": seconds["hf"] / seconds["jax"],
            "torch_threads": torch.get_num_threads(),
        }
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="bench-small,bench-medium")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="skip the HF reference")
    args = parser.parse_args()
    emit(
        [
            run(
                name,
                batch=args.batch,
                prompt_len=args.prompt_len,
                new_tokens=args.new_tokens,
                repeats=args.repeats,
                hf=args.hf,
            )
            for name in args.models.split(",")
        ]
    )


if __name__ == "__main__":
    hostmem.use_huge_pages()
    main()
