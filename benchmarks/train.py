"""`train` workload (BENCHMARKS.md): one policy-gradient update (forward, backward, AdamW)
on 32 sequences of 160 tokens (32 prompt + 128 response), clipped-surrogate loss with
`token-mean` and with `delta-l` aggregation, random advantages, old log-probs equal to the
current ones. Figures: tokens/s and MFU = 6 · params · tokens/s / (float32 matmul peak
measured in this process around each timed update; the median over rounds), against the
same update in HF transformers + torch.optim.AdamW.

    python -m benchmarks.train                          # bench-small and bench-medium
    python -m benchmarks.train --models=bench-medium --no-hf

With --memory it instead compiles the same update ahead of time for large presets on 8
fake CPU devices (abstract inputs: nothing is allocated) and prints XLA's per-device
memory for several mesh shapes (the table in docs/memory.md):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m benchmarks.train --memory --models=qwen2.5-3b,qwen2.5-7b
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks._common import (
    compile_seconds,
    emit,
    hf_twin,
    median_seconds,
    seconds_and_peaks,
)
from deltal_jax import aggregation, hostmem, policy_loss, sharding
from deltal_jax.models import get_preset, init_model, response_logprobs
from deltal_jax.models.config import REMAT_POLICIES, ModelConfig


def make_update(graphdef, tx, *, mode: str, max_response_len: int):
    """(params, opt_state, batch) → (params, opt_state, loss): one AdamW step on the
    clipped surrogate aggregated by `mode` (c_i from the whole batch's lengths)."""

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params)
        logp = response_logprobs(
            model, batch["prompt"], batch["prompt_mask"], batch["response"], batch["mask"]
        ).logp
        per_token = policy_loss.clipped_surrogate(
            logp, batch["old_logp"], batch["advantages"], batch["mask"]
        ).loss
        lengths = aggregation.response_lengths(batch["mask"])
        c = aggregation.response_coefficients(lengths, mode=mode, max_response_len=max_response_len)
        return aggregation.aggregate(per_token, batch["mask"], c)

    def update(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(update, donate_argnums=(0, 1))


def _batch(cfg, batch: int, prompt_len: int, response_len: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    lengths = rng.integers(response_len // 4, response_len + 1, batch)
    return {
        "prompt": rng.integers(0, cfg.vocab_size, (batch, prompt_len)).astype(np.int32),
        "prompt_mask": np.ones((batch, prompt_len), bool),
        "response": rng.integers(0, cfg.vocab_size, (batch, response_len)).astype(np.int32),
        "mask": np.arange(response_len)[None] < lengths[:, None],
        "advantages": rng.normal(size=batch).astype(np.float32),
    }


def _hf_seconds(model, batch, repeats: int) -> float | None:
    """Median seconds of the same update in PyTorch (token-mean aggregation); None without
    torch and transformers."""
    twin = hf_twin(model)
    if twin is None:
        return None
    import torch

    opt = torch.optim.AdamW(twin.parameters(), lr=1e-6, weight_decay=1e-4)
    prompt_len = batch["prompt"].shape[1]
    tokens = torch.tensor(np.concatenate([batch["prompt"], batch["response"]], 1), dtype=torch.long)
    response = tokens[:, prompt_len:]
    mask = torch.tensor(batch["mask"], dtype=torch.float32)
    adv = torch.tensor(batch["advantages"])[:, None]

    def step():
        logits = twin(tokens).logits[:, prompt_len - 1 : -1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, response[..., None])[..., 0]
        ratio = torch.exp(logp - logp.detach())
        loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
        loss = (loss * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return median_seconds(step, repeats=repeats)


def _time_update(compiled, params, opt_state, data, repeats: int):
    """(seconds of each timed update, the matmul peak before each, params, opt_state): the
    state is threaded through the repeats because the update donates its input buffers."""
    state = [params, opt_state]

    def step():
        state[0], state[1], loss = compiled(state[0], state[1], data)
        return loss

    return *seconds_and_peaks(step, repeats=repeats), *state


def run(
    name: str,
    *,
    batch: int,
    prompt_len: int,
    response_len: int,
    repeats: int,
    hf: bool,
    scan_layers: bool,
    remat: str,
):
    cfg = get_preset(name, scan_layers=scan_layers, remat=remat)
    model = init_model(cfg, seed=0)
    data = _batch(cfg, batch, prompt_len, response_len)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adamw(1e-6, weight_decay=1e-4)
    opt_state = tx.init(params)
    # Behaviour log-probs are the current policy's, so the first ratio is exactly 1.
    data["old_logp"] = jax.jit(
        lambda p, b: (
            response_logprobs(
                nnx.merge(graphdef, p), b["prompt"], b["prompt_mask"], b["response"], b["mask"]
            ).logp
        )
    )(params, data)
    tokens = batch * (prompt_len + response_len)
    result = {
        "workload": "train",
        "model": name,
        "params": cfg.num_params(),
        "tokens": tokens,
        "scan_layers": scan_layers,
        "remat": remat,
    }
    for mode in (aggregation.TOKEN_MEAN, aggregation.DELTA_L):
        update = make_update(graphdef, tx, mode=mode, max_response_len=response_len)
        compiled, compile_s = compile_seconds(update, params, opt_state, data)
        times, peaks, params, opt_state = _time_update(compiled, params, opt_state, data, repeats)
        seconds = statistics.median(times)
        flops = 6 * cfg.num_params() * tokens
        result[mode] = {
            "tokens_per_s": tokens / seconds,
            "seconds": seconds,
            "compile_s": compile_s,
            "matmul_peak_gflops": statistics.median(peaks) / 1e9,
            # Each round's update against the peak around it (seconds_and_peaks), and the
            # median update against the median peak as a cross-check.
            "mfu": statistics.median(flops / (t * p) for t, p in zip(times, peaks, strict=True)),
            "mfu_of_medians": flops / seconds / statistics.median(peaks),
            "round_seconds": times,
            "round_peak_gflops": [p / 1e9 for p in peaks],
        }
    hf_seconds = _hf_seconds(nnx.merge(graphdef, params), data, repeats) if hf else None
    if hf_seconds is not None:
        result["hf_tokens_per_s"] = tokens / hf_seconds
        result["speedup_vs_hf"] = hf_seconds / result[aggregation.TOKEN_MEAN]["seconds"]
    return result


def memory(name: str, mesh_shape, *, batch: int, prompt_len: int, response_len: int) -> dict:
    """Per-device GiB of one update of preset `name` (bf16 compute, fp32 params and AdamW
    moments, per-layer remat) on `mesh_shape`, from XLA's ahead-of-time memory analysis."""
    cfg = get_preset(name, dtype="bfloat16", remat="full")
    mesh = sharding.make_mesh(mesh_shape)
    tx = optax.adamw(1e-6, weight_decay=1e-4)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: init_model(cfg)), nnx.Param)
    opt_state = jax.eval_shape(tx.init, params)

    def abstract(tree):
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            tree,
            sharding.param_shardings(tree, mesh),
        )

    rows = lambda shape, dtype: jax.ShapeDtypeStruct(
        shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape))
    )
    data = {
        "prompt": rows((batch, prompt_len), jnp.int32),
        "prompt_mask": rows((batch, prompt_len), bool),
        "response": rows((batch, response_len), jnp.int32),
        "mask": rows((batch, response_len), bool),
        "advantages": rows((batch,), jnp.float32),
        "old_logp": rows((batch, response_len), jnp.float32),
    }
    update = make_update(graphdef, tx, mode=aggregation.DELTA_L, max_response_len=response_len)
    with jax.set_mesh(mesh):
        compiled = update.lower(abstract(params), abstract(opt_state), data).compile()
    m = compiled.memory_analysis()
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return {
        "workload": "train-memory",
        "model": name,
        "params": cfg.num_params(),
        "mesh": dict(zip(sharding.MESH_AXES, mesh_shape, strict=True)),
        "sequences": batch,
        "tokens_per_sequence": prompt_len + response_len,
        "per_device_gib": total / 2**30,
        "arguments_gib": m.argument_size_in_bytes / 2**30,
        "temp_gib": m.temp_size_in_bytes / 2**30,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="bench-small,bench-medium")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--response-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="skip the HF reference")
    parser.add_argument(
        "--unroll-layers",
        dest="scan_layers",
        action="store_false",
        help="unroll the layer loop (ModelConfig.scan_layers=False) instead of lax.scan",
    )
    parser.add_argument(
        "--remat",
        default=ModelConfig.remat,
        choices=REMAT_POLICIES,
        help="what the backward pass recomputes of each layer (ModelConfig.remat)",
    )
    parser.add_argument("--memory", action="store_true", help="AOT memory table instead")
    parser.add_argument("--meshes", default="8x1x1,4x2x1,2x4x1,1x8x1,1x4x2")
    args = parser.parse_args()
    if args.memory:
        meshes = [tuple(int(n) for n in m.split("x")) for m in args.meshes.split(",")]
        emit(
            [
                memory(
                    name,
                    mesh,
                    batch=args.batch,
                    prompt_len=args.prompt_len,
                    response_len=args.response_len,
                )
                for name in args.models.split(",")
                for mesh in meshes
            ]
        )
        return
    emit(
        [
            run(
                name,
                batch=args.batch,
                prompt_len=args.prompt_len,
                response_len=args.response_len,
                repeats=args.repeats,
                hf=args.hf,
                scan_layers=args.scan_layers,
                remat=args.remat,
            )
            for name in args.models.split(",")
        ]
    )


if __name__ == "__main__":
    hostmem.use_huge_pages()
    main()
