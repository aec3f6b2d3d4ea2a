"""The RLVR training loop, top to bottom.

One step (DESIGN.md):

  prompts (grain) → sample G responses each with the behaviour policy
  → verifiable rewards (+ overlong shaping, KL-in-reward) → advantages
  → aggregation coefficients c_i over the whole rollout batch, computed once
  → epochs × mini-batches of jitted updates, each a scan over micro-batches
  → metrics, evaluation every k steps, checkpoint every k steps.

Everything in `update_step` is a pure function of (params, optimiser state, batch) under
`jax.jit`; shapes are static (prompts padded to `max_prompt_len`, responses to M), so one
compilation serves the whole run. `train(config, workdir)` is importable, so the same
code runs from the CLI (`deltal_jax.main`), a notebook or a test.

Multi-host (JAX's multi-controller runtime: one process per host, all running this same
loop): the mesh spans every process's devices and every process does the same host work
on the same values, in lock-step. Each reads the whole global batch of prompts, builds
the global device arrays from it (`to_global`: each process fills only its own devices),
and gets the whole rollout back (`to_host`: an all-gather), so rewards, advantages and
the global coefficients are computed identically everywhere. Process 0 alone writes the
metrics, config.json, the plot and the warm-up model; checkpoints are collective.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deltal_jax import advantages as adv_lib
from deltal_jax import aggregation as agg
from deltal_jax import checkpointing, metrics, sampling, sharding, warmup
from deltal_jax import config as config_lib
from deltal_jax import kl as kl_lib
from deltal_jax.analysis.variance import variance_proxy
from deltal_jax.data import CountdownSpec, generate_split, get_task, pad_prompt, prompt_dataset
from deltal_jax.data import pipeline as data_pipeline
from deltal_jax.data.builders import read_math_jsonl
from deltal_jax.models import get_preset, load_model, load_tokenizer, response_logprobs
from deltal_jax.policy_loss import clipped_surrogate, entropy_bonus
from deltal_jax.rewards import RewardPool, count_reasons, score_batch

# --------------------------------------------------------------------------------------
# Data sources.
# --------------------------------------------------------------------------------------


def load_records(config: ml_collections.ConfigDict) -> tuple[list[dict], list[dict]]:
    """(train, eval) records: generated Countdown, or local JSONL math problems."""
    d = config.data
    if d.task == "countdown":
        spec = CountdownSpec(
            num_numbers=tuple(d.num_numbers),
            max_number=d.max_number,
            max_target=d.max_target,
            test_fraction=d.test_fraction,
        )
        train = generate_split("train", d.num_train, d.seed, spec)
        held_out = generate_split("test", d.num_eval, d.seed + 1, spec)
        return train, held_out
    train = read_math_jsonl(d.jsonl_train)
    held_out = read_math_jsonl(d.jsonl_test or d.jsonl_train)[: d.num_eval]
    return train, held_out


POLICY_DIR_TIMEOUT_S = 6 * 3600  # how long other processes wait for process 0's warm-up


def prepare_policy_dir(
    config, workdir: str, train_records: list[dict], evaluate_model: warmup.EvaluateFn | None
) -> str:
    """The HF-layout directory the policy loads from: a given checkpoint, the tiny
    warmed-up model the default run builds (once) in <workdir>/warmup, or a preset with
    random weights (<workdir>/init).

    In a multi-process run only process 0 builds it (on its own devices: `evaluate_model`
    must not use the global mesh) while the others wait; then every process loads it, so
    the work directory must be on a file system all hosts share. The wait is a barrier of
    the coordination service, not a device collective: a warm-up takes minutes, and the
    first CPU (gloo) collective gives up after 30 s.
    """
    if config.model.hf_dir:
        return config.model.hf_dir
    if config.model.preset != warmup.TINY_PRESET:
        directory = os.path.join(workdir, "init")
        build = functools.partial(
            warmup.build_random_model, directory, get_preset(config.model.preset),
            seed=config.seed,
        )  # fmt: skip
    else:
        directory = os.path.join(workdir, "warmup")
        if config.warmup.cache_dir:  # shared by every run with the same warm-up inputs
            directory = warmup.cache_directory(config.warmup.cache_dir, {
                "warmup": config.warmup.to_dict(), "data": config.data.to_dict(),
                "eval": config.eval.to_dict(),
                "max_prompt_len": config.rollout.max_prompt_len,
                "max_response_len": config.rollout.max_response_len,
            })  # fmt: skip
        task = get_task(config.data.task)
        build = functools.partial(
            warmup.build_warm_model,
            directory,
            train_records,
            lambda r: data_pipeline.render_prompt(task, r, config.data.template),
            steps=config.warmup.steps,
            batch_size=config.warmup.batch_size,
            learning_rate=config.warmup.learning_rate,
            seed=config.warmup.seed,
            max_prompt_len=config.rollout.max_prompt_len,
            num_examples=config.warmup.num_examples,
            solution_format=config.warmup.solution_format,
            evaluate=evaluate_model,
        )
    if jax.process_index() == 0:
        build()
    barrier = ocp.multihost.get_barrier_sync_fn()  # a no-op in a single process
    barrier(key=f"deltal_jax.train: {directory} written", timeout_ms=POLICY_DIR_TIMEOUT_S * 1000)
    return directory


def make_lr(config) -> optax.Schedule:
    """Linear warm-up (optional), then constant, cosine or linear decay to 0."""
    o = config.optim
    base = {
        "constant": lambda: optax.constant_schedule(o.learning_rate),
        "cosine": lambda: optax.cosine_decay_schedule(o.learning_rate, config.total_steps),
        "linear": lambda: optax.linear_schedule(o.learning_rate, 0.0, config.total_steps),
    }[o.schedule]()
    if not o.warmup_steps:
        return base
    warm = optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps)
    return optax.join_schedules([warm, base], [o.warmup_steps])


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay after global-norm gradient clipping."""
    o = config.optim
    chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip else []
    chain.append(optax.adamw(make_lr(config), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))
    return optax.chain(*chain)


# --------------------------------------------------------------------------------------
# The update: loss of one micro-batch, a scan over micro-batches, one optimiser step.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The static (hashable) part of the loss configuration."""

    temperature: float
    variant: str
    eps_low: float
    eps_high: float
    clip_ratio_c: float | None
    entropy_coef: float
    kl_beta: float
    kl_estimator: str
    kl_in_loss: bool
    kl_off_policy: bool

    @classmethod
    def from_config(cls, config) -> LossSettings:
        return cls(
            temperature=config.rollout.temperature,
            variant=config.loss.variant,
            eps_low=config.loss.eps_low,
            eps_high=config.loss.eps_high,
            clip_ratio_c=config.loss.clip_ratio_c or None,
            entropy_coef=config.loss.entropy_coef,
            kl_beta=config.kl.beta,
            kl_estimator=config.kl.estimator,
            kl_in_loss=config.kl.beta > 0 and config.kl.placement in ("loss", "both"),
            kl_off_policy=config.kl.off_policy_correction,
        )


def microbatch_loss(params, graphdef, mb: dict, s: LossSettings):
    """Σ over this micro-batch of the global-coefficient-weighted terms (ALGORITHMS.md §0):
    − Σ_i c_i Σ_t m·s  +  β Σ_i c^KL_i Σ_t m·k  −  coef Σ_i c^H_i Σ_t m·H.
    Summing it over micro-batches gives the mini-batch loss exactly."""
    model = nnx.merge(graphdef, params)
    mask = mb["resp_mask"]
    tl = response_logprobs(
        model, mb["prompt_ids"], mb["prompt_mask"], mb["resp_ids"], mask, temperature=s.temperature
    )
    pg = clipped_surrogate(
        tl.logp, mb["old_logp"], mb["advantages"], mask,
        eps_low=s.eps_low, eps_high=s.eps_high, clip_ratio_c=s.clip_ratio_c, variant=s.variant,
    )  # fmt: skip
    pg_loss = agg.aggregate(pg.loss, mask, mb["coef"])
    loss = pg_loss
    aux = {"loss/policy": pg_loss}
    if s.kl_in_loss:
        per_token = kl_lib.loss_per_token(
            tl.logp, mb["ref_logp"], estimator=s.kl_estimator, beta=s.kl_beta,
            old_logp=mb["old_logp"] if s.kl_off_policy else None,
        )  # fmt: skip
        aux["loss/kl"] = agg.aggregate(per_token, mask, mb["kl_coef"])
        loss += aux["loss/kl"]
    if s.entropy_coef:
        aux["loss/entropy"] = agg.aggregate(
            entropy_bonus(tl.entropy, s.entropy_coef), mask, mb["entropy_coef"]
        )
        loss += aux["loss/entropy"]
    # Token-mean statistics, as sums here; `stat_coef` is 1/(tokens in the mini-batch).
    token_mean = lambda x: agg.aggregate(x.astype(jnp.float32), mask, mb["stat_coef"])
    aux.update({
        "entropy": token_mean(tl.entropy),
        "clip_frac/low": token_mean(pg.clipped_low),
        "clip_frac/high": token_mean(pg.clipped_high),
        "clip_frac/dual": token_mean(pg.dual_clipped),
        "ratio/mean": token_mean(pg.ratio),
    })  # fmt: skip
    return loss, aux


@functools.partial(jax.jit, static_argnums=(0, 1, 5), donate_argnums=(2, 3))
def update_step(graphdef, tx, params, opt_state, minibatch: dict, settings: LossSettings):
    """One optimiser step on a mini-batch laid out [K micro-batches, rows, ...].

    Gradients are summed over micro-batches (the coefficients are global, so the sum is
    the mini-batch gradient). A non-finite loss or gradient leaves params and optimiser
    state unchanged; the caller counts it.
    """
    grad_fn = jax.value_and_grad(microbatch_loss, has_aux=True)

    def accumulate(grads, mb):
        (loss, aux), g = grad_fn(params, graphdef, mb, settings)
        return jax.tree.map(jnp.add, grads, g), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (losses, aux) = jax.lax.scan(accumulate, zeros, minibatch)
    loss = jnp.sum(losses)
    aux = jax.tree.map(jnp.sum, aux)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    stats = {**aux, "loss/total": loss, "grad_norm": grad_norm, "finite": finite}
    return keep(new_params, params), keep(new_opt_state, opt_state), stats


@functools.partial(jax.jit, static_argnums=(0, 6))
def sequence_logprobs(graphdef, params, prompt_ids, prompt_mask, resp_ids, resp_mask, temp):
    """Teacher-forced log-probs [N, M] (the reference model's, for KL)."""
    model = nnx.merge(graphdef, params)
    return response_logprobs(
        model, prompt_ids, prompt_mask, resp_ids, resp_mask, temperature=temp
    ).logp


# --------------------------------------------------------------------------------------
# Host ↔ device. Every process holds the same whole host batch (it reads every prompt of
# the global batch and gets every response back), which costs each host the tokenising of
# B prompts and an all-gather of the [B·G, M] rollout per step: small beside sampling, and
# the rollout is needed whole anyway for group advantages and the global normalisers.
# It also keeps the data order of a run independent of the number of processes. For
# input pipelines too heavy to replicate, the scalable alternative is per-host shards
# (`prompt_dataset(shard_index=jax.process_index(), ...)`) assembled with
# `jax.make_array_from_process_local_data`; a step's prompts then depend on the host
# count unless each host's shard is exactly the rows its devices hold.
# --------------------------------------------------------------------------------------


def to_global(x: np.ndarray, array_sharding: jax.sharding.Sharding) -> jax.Array:
    """The global array holding `x`, a host value every process has whole: each process
    fills only its own devices' slices (in one process, the same as `jax.device_put`)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, array_sharding, lambda index: x[index])


def shard_rows(tree, mesh):
    """Global arrays of a pytree of host arrays, rows split over the data axes."""
    return jax.tree.map(lambda x: to_global(x, sharding.batch_sharding(mesh, np.ndim(x))), tree)


def to_host(tree):
    """Host NumPy copies of device arrays, whole on every process: arrays with shards on
    other processes are all-gathered (a collective: every process must call this)."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(get, tree)


def agree(x: np.ndarray, mesh) -> np.ndarray:
    """Process 0's value of a host array, on every process of `mesh`.

    Every process scores the same responses, but a verifier's time limit can expire on
    one host and not on another; taking process 0's scores keeps the rewards, the
    advantages and the loop's decisions (dynamic sampling) identical on all hosts, which
    the global arrays built from them and the lock-step collectives rely on. A mesh of
    one process's devices (one process, or the warm-up's evaluation) has nothing to agree.
    """
    if not mesh.is_multi_process:
        return x
    return np.asarray(multihost_utils.broadcast_one_to_all(x)).astype(x.dtype)


# --------------------------------------------------------------------------------------
# Rollouts and evaluation.
# --------------------------------------------------------------------------------------


def generate(graphdef, params, prompt_ids, prompt_mask, key, cfg, mesh):
    """Samples responses on the mesh and returns them as host numpy arrays (whole on
    every process)."""
    batch = shard_rows({"ids": prompt_ids, "mask": prompt_mask}, mesh)
    with jax.set_mesh(mesh):
        out = sampling.generate(nnx.merge(graphdef, params), batch["ids"], batch["mask"], key, cfg)
    return to_host(out)


def decode(tokenizer, out: sampling.SampleOutput) -> list[str]:
    return [tokenizer.decode(t[:n].tolist()) for t, n in zip(out.tokens, out.lengths, strict=True)]


def evaluate(graphdef, params, eval_set, tokenizer, config, mesh, pool) -> dict[str, float]:
    """Avg@k and Pass@k on the held-out prompts at the eval temperature, fixed seed."""
    k = config.eval.num_samples
    cfg = sampling.SamplingConfig(
        max_new_tokens=config.rollout.max_response_len, temperature=config.eval.temperature,
        eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id,
        cache_phases=config.rollout.cache_phases,
    )  # fmt: skip
    scores, lengths = [], []
    for j in range(k):
        key = jax.random.fold_in(jax.random.key(config.eval.seed), j)
        out = generate(graphdef, params, eval_set["prompt_ids"], eval_set["prompt_mask"], key,
                       cfg, mesh)  # fmt: skip
        scored = score_batch(decode(tokenizer, out), eval_set["metas"], eval_set["verifier"],
                             timeout_s=config.reward.timeout_s, pool=pool)  # fmt: skip
        scores.append(agree(scored.scores, mesh))
        lengths.append(out.lengths)
    correct = np.stack(scores) >= 1.0  # [k, n]
    return {
        "eval/accuracy": float(correct.mean()),  # Avg@k
        f"eval/pass@{k}": float(correct.any(0).mean()),
        "eval/response_length": float(np.mean(lengths)),
    }


def build_eval_set(records, tokenizer, config) -> dict[str, Any]:
    task = get_task(config.data.task)
    ids, masks = zip(
        *(pad_prompt(tokenizer.encode(data_pipeline.render_prompt(task, r, config.data.template)),
                     config.rollout.max_prompt_len, tokenizer.pad_id) for r in records),
        strict=True,
    )  # fmt: skip
    n = len(records) - len(records) % max(jax.device_count(), 1)  # rows split over devices
    return {
        "prompt_ids": np.stack(ids)[:n],
        "prompt_mask": np.stack(masks)[:n],
        "metas": [task.reward_meta(r) for r in records[:n]],
        "verifier": config.reward.verifier or task.verifier,
    }


# --------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict[str, float]:
    """Runs (or resumes) a training run in `workdir`; returns the last step's metrics."""
    config_lib.validate(config)
    main_process = jax.process_index() == 0  # the one that writes files
    os.makedirs(workdir, exist_ok=True)
    if main_process:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    r_cfg, G, B = config.rollout, config.rollout.group_size, config.rollout.prompts_per_step
    n_rows, M = B * G, config.rollout.max_response_len

    # ---- Mesh --------------------------------------------------------------------------
    mesh = sharding.make_mesh((config.mesh.data, config.mesh.fsdp, config.mesh.tensor))
    n_data = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = config.ppo.microbatch_size or n_rows // config.ppo.minibatches
    # Mini-batches are laid out [K, micro, ...]; the micro-batch rows split over the data axes.
    microbatch_sharding = NamedSharding(mesh, P(None, sharding.BATCH))
    if micro % n_data:
        raise config_lib.ConfigError(
            f"config.ppo.microbatch_size={micro} rows must be divisible by the "
            f"{n_data} data-parallel devices of mesh {dict(mesh.shape)}."
        )

    # ---- Data and policy -------------------------------------------------------------------
    train_records, eval_records = load_records(config)
    pool = RewardPool(config.reward.num_workers)

    # The warm-up's before/after figures. Only process 0 warms up, so in a multi-process
    # run it evaluates on its own devices: the global mesh would wait for the others.
    if jax.process_count() == 1:
        warmup_mesh = mesh
    else:
        warmup_mesh = sharding.make_mesh((-1, 1, 1), devices=jax.local_devices())

    def evaluate_model(model, tokenizer):
        eval_set = build_eval_set(eval_records, tokenizer, config)
        return evaluate(*nnx.split(model), eval_set, tokenizer, config, warmup_mesh, pool)

    policy_dir = prepare_policy_dir(config, workdir, train_records, evaluate_model)
    tokenizer = load_tokenizer(policy_dir)
    model, _ = load_model(
        policy_dir, mesh=mesh, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
        remat=config.model.remat, scan_layers=config.model.scan_layers,
    )  # fmt: skip
    graphdef, params = nnx.split(model)
    tx = make_optimizer(config)
    # Adam's moments sharded like the parameters they track (the partition rules match
    # their paths); left to itself, init would replicate them on every device.
    opt_shardings = sharding.param_shardings(jax.eval_shape(tx.init, params), mesh)
    with jax.set_mesh(mesh):
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    kl_on = config.kl.beta > 0
    ref_params = jax.tree.map(jnp.copy, params) if kl_on else None
    task = get_task(config.data.task)
    verifier = config.reward.verifier or task.verifier
    # Not sharded by process: every process reads the whole global batch (see to_global).
    dataset = prompt_dataset(
        train_records, config.data.task, encode=tokenizer.encode, pad_id=tokenizer.pad_id,
        max_prompt_len=r_cfg.max_prompt_len, batch_size=B, seed=config.seed,
        template=config.data.template,
    )  # fmt: skip
    data_iter = iter(dataset)
    eval_set = build_eval_set(eval_records, tokenizer, config)
    sample_cfg = sampling.SamplingConfig(
        max_new_tokens=M, temperature=r_cfg.temperature, top_k=r_cfg.top_k, top_p=r_cfg.top_p,
        eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id, cache_phases=r_cfg.cache_phases,
    )  # fmt: skip
    settings = LossSettings.from_config(config)

    # ---- Resume ----------------------------------------------------------------------------
    # Replicated on the mesh, so a restored key lands where the computations run.
    rng = jax.jit(functools.partial(jax.random.key, config.seed),
                  out_shardings=NamedSharding(mesh, P()))()  # fmt: skip
    state = {"params": params, "opt_state": opt_state, "rng": rng}
    sync_every = config.rollout.sync_every
    if sync_every != 1:  # semi-online / offline: the sampler keeps its own copy
        state["behaviour"] = jax.tree.map(jnp.copy, params)
    ckpt = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint.max_to_keep,
        save_every=config.checkpoint.every,
    )  # fmt: skip
    extra = {"step": 0, "nonfinite_updates": 0}
    if ckpt.latest_step() is not None:
        state, data_state, extra = ckpt.restore(state)
        data_iter.set_state(data_state)
        print(f"Resumed from step {extra['step']} in {workdir}")
    start = extra["step"]
    writer = metrics.MetricWriter(  # with no sinks on the other processes
        workdir, tensorboard=main_process and config.logging.tensorboard, jsonl=main_process,
        console=main_process and config.logging.console,
        wandb_project=(main_process and config.logging.wandb_project) or None,
        total_steps=config.total_steps, config=config.to_dict(),
    )  # fmt: skip
    preempted = checkpointing.install_preemption_handler()
    if start == 0:
        first = evaluate(graphdef, state["params"], eval_set, tokenizer, config, mesh, pool)
        warmup_report = os.path.join(policy_dir, warmup.REPORT)
        if os.path.isfile(warmup_report):
            with open(warmup_report) as f:
                first.update({f"warmup/{k}": v for k, v in json.load(f).items()})
        writer.write(0, first)

    last: dict[str, float] = {}
    try:
        for step in range(start + 1, config.total_steps + 1):
            t_step = time.perf_counter()
            timings = dict.fromkeys(("sample", "reward", "reference", "update", "eval"), 0.0)
            if sync_every > 1 and (step - 1) % sync_every == 0:
                # A copy: the update donates (and so invalidates) the params' buffers.
                state["behaviour"] = jax.tree.map(jnp.copy, state["params"])
            behaviour = state.get("behaviour", state["params"])

            # ---- Rollout: sample, score, (DAPO) keep informative groups ------------------------
            groups: list[dict] = []
            filler: list[dict] = []
            rounds = 0
            while len(groups) < B and rounds < (
                r_cfg.max_sampling_rounds if r_cfg.dynamic_sampling else 1
            ):
                rounds += 1
                batch = next(data_iter)
                state["rng"], key = jax.random.split(state["rng"])
                prompt_ids = np.repeat(batch["prompt_ids"], G, axis=0)
                prompt_mask = np.repeat(batch["prompt_mask"], G, axis=0)
                t0 = time.perf_counter()
                out = generate(graphdef, behaviour, prompt_ids, prompt_mask, key,
                               sample_cfg, mesh)  # fmt: skip
                timings["sample"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                metas = [m for m in data_pipeline.reward_metas(batch) for _ in range(G)]
                scored = score_batch(decode(tokenizer, out), metas, verifier,
                                     timeout_s=config.reward.timeout_s, pool=pool)  # fmt: skip
                scores = agree(scored.scores, mesh)
                timings["reward"] += time.perf_counter() - t0
                rollout = {
                    "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
                    "resp_ids": out.tokens, "resp_mask": out.mask, "old_logp": out.logprobs,
                    "lengths": out.lengths, "truncated": out.truncated, "score": scores,
                }  # fmt: skip
                keep = (
                    np.asarray(adv_lib.informative_groups(jnp.asarray(scores), G))
                    if r_cfg.dynamic_sampling
                    else np.ones(B, bool)
                )
                for g in range(B):
                    rows = {k: v[g * G : (g + 1) * G] for k, v in rollout.items()}
                    (groups if keep[g] else filler).append(rows)
            n_informative = min(len(groups), B)
            groups = (groups + filler)[:B]
            roll = {k: np.concatenate([g[k] for g in groups]) for k in groups[0]}

            # ---- Rewards, KL, advantages, coefficients (global, once per step) -------------
            rewards = roll["score"].astype(np.float32)
            if config.reward.overlong_buffer:
                rewards = rewards + np.asarray(adv_lib.soft_overlong_punishment(
                    jnp.asarray(roll["lengths"]), max_response_len=M,
                    cache_len=config.reward.overlong_buffer, factor=config.reward.overlong_factor,
                ))  # fmt: skip
            if kl_on:
                t0 = time.perf_counter()
                inputs = shard_rows([roll[k] for k in ("prompt_ids", "prompt_mask", "resp_ids",
                                                       "resp_mask")], mesh)  # fmt: skip
                with jax.set_mesh(mesh):
                    ref_logp = sequence_logprobs(graphdef, ref_params, *inputs, r_cfg.temperature)
                roll["ref_logp"] = to_host(ref_logp)
                timings["reference"] = time.perf_counter() - t0
                kl_tokens = kl_lib.kl_per_token(
                    jnp.asarray(roll["old_logp"]), jnp.asarray(roll["ref_logp"]), "k1"
                )
                kl_value = float(np.sum(np.where(roll["resp_mask"], kl_tokens, 0)) / n_rows)
                if config.kl.placement in ("reward", "both"):
                    rewards = rewards - np.asarray(kl_lib.reward_penalty(
                        roll["old_logp"], roll["ref_logp"], roll["resp_mask"],
                        estimator=config.kl.estimator, beta=config.kl.beta,
                    ))  # fmt: skip
            advantages = np.asarray(adv_lib.compute(
                config.advantage.estimator, jnp.asarray(rewards), G,
                eps=config.advantage.eps, ddof=config.advantage.ddof,
            ))  # fmt: skip
            if config.reward.overlong_filter:
                advantages = np.where(roll["truncated"], 0.0, advantages)
            roll["advantages"] = advantages.astype(np.float32)
            lengths = roll["resp_mask"].sum(-1).astype(np.float32)
            n_mini = config.ppo.minibatches
            k_micro = (n_rows // n_mini) // micro
            # Global c_i over the rollout batch; one of P mini-batch steps scales by P. The
            # KL and entropy terms have their own aggregation; logged statistics are
            # token means.
            n_chunks = n_mini * k_micro
            for name, mode in (("coef", config.loss.aggregation),
                               ("kl_coef", config.kl.aggregation),
                               ("entropy_coef", config.loss.entropy_aggregation),
                               ("stat_coef", "token-mean")):  # fmt: skip
                roll[name] = n_mini * np.asarray(agg.response_coefficients(
                    jnp.asarray(lengths), mode=mode, max_response_len=M, alpha=config.loss.alpha,
                    scope=config.loss.scope, group_size=G, num_microbatches=n_chunks,
                ))  # fmt: skip

            # ---- Update: epochs × mini-batches, each a scan over micro-batches -------------
            t0 = time.perf_counter()
            fields = ["prompt_ids", "prompt_mask", "resp_ids", "resp_mask", "old_logp",
                      "advantages", "coef", "kl_coef", "entropy_coef", "stat_coef"]  # fmt: skip
            fields += ["ref_logp"] if kl_on else []
            perm_rng = np.random.default_rng([config.seed, step])
            update_stats = []
            for _ in range(config.ppo.epochs):
                order = perm_rng.permutation(n_rows) if n_mini > 1 else np.arange(n_rows)
                for j in range(n_mini):
                    rows = order[j * (n_rows // n_mini) : (j + 1) * (n_rows // n_mini)]
                    mb = {f: roll[f][rows].reshape(k_micro, micro, *roll[f].shape[1:])
                          for f in fields}  # fmt: skip
                    mb = jax.tree.map(lambda x: to_global(x, microbatch_sharding), mb)
                    with jax.set_mesh(mesh):
                        state["params"], state["opt_state"], stats = update_step(
                            graphdef, tx, state["params"], state["opt_state"], mb, settings
                        )
                    stats = to_host(stats)
                    if not stats["finite"]:
                        extra["nonfinite_updates"] += 1
                        print(f"step {step}: non-finite loss or gradient, update skipped "
                              f"({extra['nonfinite_updates']} so far)")  # fmt: skip
                    update_stats.append(stats)
            timings["update"] = time.perf_counter() - t0
            if extra["nonfinite_updates"] > config.ppo.max_nonfinite_updates:
                raise FloatingPointError(
                    f"{extra['nonfinite_updates']} updates had a non-finite loss or gradient "
                    f"(limit config.ppo.max_nonfinite_updates="
                    f"{config.ppo.max_nonfinite_updates}); the last checkpoint "
                    f"(step {ckpt.latest_step()}) is intact."
                )

            # ---- Metrics, evaluation, checkpoint -------------------------------------------
            step_metrics = rollout_metrics(roll, rewards, G, M, config)
            step_metrics.update({k: float(np.mean([s[k] for s in update_stats]))
                                 for k in update_stats[0] if k != "finite"})  # fmt: skip
            step_metrics.update({
                "rollout/informative_groups": n_informative / B,
                "rollout/sampling_rounds": rounds,
                "update/nonfinite_total": extra["nonfinite_updates"],
                "lr": float(make_lr(config)(step - 1)),
                **({"kl": kl_value} if kl_on else {}),
            })  # fmt: skip
            step_metrics.update({f"reward/reason/{k}": v for k, v in
                                 count_reasons(scored.reasons).items()})  # fmt: skip
            if step % config.eval.every == 0 or step == config.total_steps:
                t0 = time.perf_counter()
                step_metrics.update(
                    evaluate(graphdef, state["params"], eval_set, tokenizer, config, mesh, pool)
                )
                timings["eval"] = time.perf_counter() - t0
            step_time = time.perf_counter() - t_step
            step_metrics.update({f"time/{k}": v for k, v in timings.items()})
            step_metrics["time/other"] = step_time - sum(timings.values())
            step_metrics["time/step"] = step_time
            step_metrics["throughput/tokens_per_s"] = float(lengths.sum()) / step_time
            writer.write(step, step_metrics)
            extra["step"] = step
            stop = preempted()
            ckpt.save(step, state, data_state=data_iter.get_state(), extra=extra,
                      force=stop or step == config.total_steps)  # fmt: skip
            last = step_metrics
            if on_step is not None:
                on_step(step, step_metrics)
            if stop:
                print(f"SIGTERM received: saved step {step}, exiting.")
                break
    finally:
        ckpt.close()
        writer.close()
        pool.close()
        preempted.uninstall()
    if config.logging.plot and main_process:
        metrics.plot_curves(writer.jsonl_path, os.path.join(workdir, "curves.png"))
    return last


def rollout_metrics(roll, rewards, G, M, config) -> dict[str, float]:
    """The per-step statistics researchers compare runs with."""
    lengths = roll["lengths"].astype(np.float64)
    score = roll["score"]
    groups = rewards.reshape(-1, G)
    coef = roll["coef"] / config.ppo.minibatches
    stats = agg.coefficient_stats(jnp.asarray(coef), jnp.asarray(lengths), max_response_len=M)
    delta_l = np.asarray(agg.response_coefficients(
        jnp.asarray(lengths), mode="delta-l", max_response_len=M, alpha=config.loss.alpha,
    ))  # fmt: skip
    # The update's variance under Var(g_i) ∝ A_i² L_i (ALGORITHMS.md §1), from c, L and A.
    proxy = variance_proxy(jnp.asarray(coef), jnp.asarray(lengths), roll["advantages"])
    return {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()),
        "accuracy": float((score >= 1.0).mean()),
        "response_length/mean": float(lengths.mean()),
        "response_length/min": float(lengths.min()),
        "response_length/max": float(lengths.max()),
        "response_length/clip_ratio": float(roll["truncated"].mean()),
        "advantage/zero_groups": float(np.mean(groups.std(-1) == 0)),
        "aggregation/coef_sum_times_m": float(stats["coef_sum_times_m"]),
        "aggregation/harmonic_len_over_m": float(stats["harmonic_len_over_m"]),
        "aggregation/coef_max_over_min": float(stats["coef_max_over_min"]),
        "aggregation/delta_l_weight_max": float(delta_l.max() * M * len(lengths)),
        "aggregation/delta_l_weight_min": float(delta_l.min() * M * len(lengths)),
        "aggregation/variance_proxy": float(proxy["proxy"]),
        "aggregation/variance_proxy_relative": float(proxy["relative"]),
    }
