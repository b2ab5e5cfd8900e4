"""The objective-agnostic training loop: build, restore, step, evaluate, checkpoint.

Reads top to bottom: `train_and_evaluate` sets everything up from the config, then runs
`train_step` (jitted once, sharded, state donated) with a few periodic hooks. Nothing in
here knows which objective it trains.
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import struct
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from lm import checkpoint, objectives, optim, reporting, rundir, sharding
from lm.config_base import to_model_config
from lm.objectives.base import Objective


@struct.dataclass
class TrainState:
    step: jnp.ndarray
    params: Any
    opt_state: Any
    rng: jnp.ndarray  # raw key data; per-step keys fold in the step, so resume is exact


@struct.dataclass
class Setup:
    """Everything built from a config, shared by training, evaluation and sampling."""

    objective: Objective = struct.field(pytree_node=False)
    model: nn.Module = struct.field(pytree_node=False)
    model_cfg: Any = struct.field(pytree_node=False)
    data: Any = struct.field(pytree_node=False)
    mesh: Any = struct.field(pytree_node=False)
    tx: Any = struct.field(pytree_node=False)
    lr: Callable = struct.field(pytree_node=False)
    state_sharding: Any = struct.field(pytree_node=False)
    init_state: Callable = struct.field(pytree_node=False)
    rules: Any = struct.field(pytree_node=False, default=sharding.RULES["dp"])


class NonFiniteLoss(RuntimeError):
    pass


def build(config: ConfigDict, workdir: str) -> Setup:
    """Mesh, data, model, optimizer and the sharded state initializer (no compute yet)."""
    devices = jax.devices()[: config.mesh.num_devices] if config.mesh.num_devices else None
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
    sharding.get_rules(config.mesh.rules)  # a bad preset fails before the data is built
    sharding.check_batch_divisible(config.train.batch_size, mesh)
    accum = config.optim.grad_accum_steps
    if accum < 1 or (config.train.batch_size // jax.process_count()) % accum:
        raise ValueError(f"optim.grad_accum_steps={accum} must divide the per-process batch "
                         f"({config.train.batch_size // jax.process_count()})")
    objective = objectives.get(config)
    data = objective.build_data(workdir, jax.process_index(), jax.process_count())
    model_cfg = to_model_config(config.model, **objective.model_overrides(data))
    return assemble(config, objective, model_cfg, mesh, data)


def assemble(config: ConfigDict, objective: Objective, model_cfg: Any, mesh, data: Any = None
             ) -> Setup:
    """Model, optimizer and sharded state initializer on `mesh` (also for ahead-of-time
    compilation, which has no data: `data` None)."""
    rules = sharding.get_rules(config.mesh.rules)
    model = objective.build_model(model_cfg)
    tx, lr = optim.build(config.optim, config.train.steps)
    state_sharding, init_state = make_state_init(config, objective, model, tx, mesh, rules)
    return Setup(objective, model, model_cfg, data, mesh, tx, lr, state_sharding, init_state,
                 rules)


def make_state_init(config: ConfigDict, objective: Objective, model: nn.Module, tx, mesh,
                    rules) -> tuple[Any, Callable[[], TrainState]]:
    """(state shardings, a no-argument jitted initializer of the sharded TrainState)."""
    dummy = objective.dummy_batch(1)

    def init_boxed(rng):
        params = objective.init(model, rng, dummy)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), rng=jax.random.key_data(rng))

    key = jax.random.key(config.seed)
    abstract = jax.eval_shape(init_boxed, key)
    state_sharding = sharding.param_shardings(abstract, mesh, rules)
    init_state = jax.jit(lambda rng: nn.unbox(init_boxed(rng)), out_shardings=state_sharding)
    return state_sharding, functools.partial(init_state, key)


def make_train_step(setup: Setup, accum: int, steps: int = 1) -> Callable:
    """(state, batch) -> (state, metrics); gradient accumulation over `accum` micro-batches
    (rows i, i + accum, ... form micro-batch i, so each device keeps its own rows).

    With `steps` > 1 one compiled call runs that many optimizer steps (`lax.scan`):
    (state, tuple of `steps` batches) -> (state, metrics with a leading axis of `steps`).
    Each step computes exactly what a single step would; fewer dispatches and one XLA
    program per call save the per-call overhead that dominates small models."""
    objective, model, tx = setup.objective, setup.model, setup.tx

    def loss_fn(params, batch, rng):
        metrics = objective.metrics(model, params, batch, rng, train=True)
        total, count = metrics["loss"]
        return total / jnp.maximum(count, 1.0), metrics

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if accum == 1:
            (_, metrics), grads = grad_fn(state.params, batch, rng)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1),
                batch)

            def body(carry, xs):
                i, mb = xs
                (_, m), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (g, m)), None

            first = jax.tree.map(lambda x: x[0], micro)
            (_, m_shape), g_shape = jax.eval_shape(grad_fn, state.params, first, rng)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (g_shape, m_shape))
            (grads, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
            grads = jax.tree.map(lambda g: g / accum, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        out = {f"train/{k}": s / jnp.maximum(c, 1.0) for k, (s, c) in metrics.items()}
        out["train/lr"] = setup.lr(state.step)
        out["train/grad_norm"] = optax.tree.norm(grads)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), out

    def multi_step(state: TrainState, batches):
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
        return jax.lax.scan(train_step, state, stacked)

    batch_sh = sharding.batch_sharding(setup.mesh)
    jitted = jax.jit(train_step if steps == 1 else multi_step,
                     in_shardings=(setup.state_sharding, batch_sh),
                     out_shardings=(setup.state_sharding, sharding.replicated(setup.mesh)),
                     donate_argnums=0)
    return sharding.Constrained(jitted, setup.mesh, setup.rules)


def make_evaluate(setup: Setup, max_batches: int) -> Callable[[Any], dict[str, float]]:
    """params -> {'eval/<name>': value} over the validation pass (sums kept on device)."""
    objective, model = setup.objective, setup.model

    def eval_metrics(params, batch):
        return objective.metrics(model, params, batch, None, train=False)

    eval_step = sharding.Constrained(jax.jit(eval_metrics), setup.mesh, setup.rules)

    def evaluate(params) -> dict[str, float]:
        sums = None
        for i, batch in enumerate(setup.data.eval_batches()):
            if max_batches and i >= max_batches:
                break
            m = eval_step(params, sharding.shard_batch(batch, setup.mesh))
            sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
        if sums is None:
            raise ValueError("data: the validation split produced no batch")
        return objective.summarize(jax.device_get(sums), "eval")

    return evaluate


class Preemption:
    """SIGTERM sets a flag; `requested()` agrees on it across hosts every `sync_every`."""

    def __init__(self, sync_every: int):
        self.flag = False
        self.sync_every = sync_every
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        logging.warning("SIGTERM received: saving a checkpoint and exiting")
        self.flag = True

    def requested(self, step: int, since: int | None = None) -> bool:
        """Whether to stop after `step` (the hosts agree when a multiple of `sync_every`
        lies in (since, step]; `since` defaults to step - 1)."""
        if jax.process_count() == 1:
            return self.flag
        since = step - 1 if since is None else since
        if step // self.sync_every == since // self.sync_every:
            return False
        flags = multihost_utils.process_allgather(np.array(self.flag))
        return bool(np.any(flags))


def train_and_evaluate(config: ConfigDict, workdir: str) -> dict[str, float]:
    """Trains to `config.train.steps`, resuming from the latest checkpoint in `workdir`.

    Returns the last logged metrics (train and eval)."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:  # the other hosts of a multi-host run share the workdir
        with rundir.WorkdirLock(workdir):
            return _train_and_evaluate(config, workdir)
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ConfigDict, workdir: str) -> dict[str, float]:
    tc = config.train
    setup = build(config, workdir)
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=tc.keep_checkpoints,
                                   save_every=tc.checkpoint_every, async_save=tc.async_checkpoint)
    state = setup.init_state()
    restored = ckpt.restore_latest(checkpoint.abstract_like(state))
    start = None
    if restored is not None:
        start, state, data_state = restored
        setup.data.train_iter.set_state(data_state)
        logging.info("resumed from step %d", start)
    elif config.init_from:
        from lm import init_from  # noqa: PLC0415 (only runs that ask for it pay the import)

        state = state.replace(params=init_from.load_params(config.init_from, state.params))
    start = start or 0

    reporting.write_config(workdir, config.to_dict())
    writer = reporting.MetricWriter(workdir, truncate_after=start)
    step_fns: dict[int, Callable] = {}  # steps per call -> its compiled step

    def run_steps(state: TrainState, n: int) -> tuple[TrainState, Any]:
        """`n` optimizer steps in one compiled call, on the next `n` batches."""
        if n not in step_fns:
            step_fns[n] = make_train_step(setup, config.optim.grad_accum_steps, n)
        batches = [sharding.shard_batch(next(setup.data.train_iter), setup.mesh)
                   for _ in range(n)]
        return step_fns[n](state, batches[0] if n == 1 else tuple(batches))

    def steps_in_call(step: int) -> int:
        """train.steps_per_call, cut short so every call ends on an eval / checkpoint step."""
        return min(tc.steps_per_call, tc.steps - step,
                   *(every - step % every for every in (tc.eval_every, tc.checkpoint_every)))

    evaluate = make_evaluate(setup, config.evals.max_batches)
    tokens_per_step = tc.batch_size * setup.objective.tokens_per_example()
    peak = reporting.device_peak_flops(jax.devices()[0], setup.model_cfg.dtype)
    throughput = reporting.Throughput(setup.objective.flops_per_token(setup.model_cfg),
                                      tokens_per_step, jax.device_count(), peak,
                                      total_steps=tc.steps)
    progress = reporting.ProgressLine(tc.steps, every=tc.log_every)
    fetcher = reporting.MetricsFetcher()
    preemption = Preemption(tc.preemption_sync_every)
    last: dict[str, float] = {}
    decode_every = int(config.evals.get("decode_every", 0))

    def report(items: list[reporting.StepMetrics]) -> None:
        logged = [i for i in items if i.step % tc.log_every == 0 or i.step == tc.steps]
        for item in items:
            loss = item.metrics.get("train/loss", 0.0)
            if not np.isfinite(loss):
                raise NonFiniteLoss(f"train/loss is {loss} at step {item.step}; the last good "
                                    f"checkpoint is step {ckpt.latest_step()}")
            if item in logged:  # rates come with the call's last logged step (one clock read)
                perf = throughput.update(item.step) if item is logged[-1] else {}
                metrics = {**item.metrics, **perf}
                writer.write(item.step, metrics)
                progress.maybe_log(item.step, metrics, force=item.step == tc.steps)
                last.update(metrics)

    def save(step: int, force: bool = False) -> None:
        if ckpt.should_save(step, force=force):
            report(fetcher.flush())  # never checkpoint a state whose loss is not finite
            ckpt.save(step, state, setup.data.train_iter.get_state(), force=force)

    profiler = reporting.Profiler(workdir, tc.profile_start, tc.profile_steps)
    throughput.reset(start)
    try:
        step = start
        while step < tc.steps:
            n = steps_in_call(step)
            profiler.before(step + 1, step + n)
            state, metrics = run_steps(state, n)
            step += n
            profiler.after(step, state)
            report(fetcher.push(step, metrics, count=n))
            if step % tc.eval_every == 0 or step == tc.steps:
                report(fetcher.flush())
                eval_metrics = evaluate(state.params)
                if decode_every and (step % decode_every == 0 or step == tc.steps):
                    eval_metrics.update(setup.objective.generation_metrics(setup.model_cfg,
                                                                           state.params))
                writer.write(step, eval_metrics)
                logging.info("step %d | %s", step, " | ".join(
                    f"{k} {v:.4f}" for k, v in eval_metrics.items()))
                last.update(eval_metrics)
                throughput.reset(step)  # eval time is not training throughput
            if preemption.requested(step, since=step - n):
                save(step, force=True)
                ckpt.wait()
                logging.info("preempted at step %d: checkpoint saved", step)
                return last
            save(step, force=step == tc.steps)
        report(fetcher.flush())
    finally:
        ckpt.wait()
        ckpt.close()
        writer.close()
    return last
