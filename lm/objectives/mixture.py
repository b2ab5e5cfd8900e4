"""A mixture of tasks on one shared model: min_θ Σ_m w_m L_m(θ; D_m).

`config.tasks` maps a task name to its settings: `objective` (any registered objective but
'mixture'), `data` (that objective's `config.data`), `rate` (for `data.mixing='explicit'`),
`weight` (w_m, default 1) and `examples` (0: counted from the data; used by the
examples-proportional and temperature rates). Mixing and batch building are
`data.mixing`, `data.rate_cap`, `data.temperature`, `data.batching`: see lm.data.mixture.

Each task is its own objective, built on the mixture's config with its `objective` and
`data` swapped in, so its data, loss and metrics are exactly the single-task ones; its files
(tokenizer, labels.json, data caches) live in workdir/tasks/<name>/. One model config serves
every task: the backbone (embeddings + stack) is shared and each task keeps its head.

Parameters: the backbone keeps the path it has in the single-task models (`encoder/...`
for encoder tasks; `embedder`, `layers`, `final_norm` at the root for decoder tasks), and
task m's head (pooler, classifier, MLM head, untied lm_head, ...) sits under
`heads/<m>/`, named as in its single-task model. So `init_from` moves a backbone between a
mixture run and any single-task run in both directions, and a single-task head loads into
the mixture's heads (lm.init_from). The first task (in name order) initialises the
backbone with the run's key, so a one-task mixture starts from the single-task run's
parameters.

Loss: Σ_m w_m L_m over the tasks in the batch (one task, or all, by `data.batching`),
each L_m its objective's own mean. Metrics: `train/<m>/<name>` for the tasks of the step,
`eval/<m>/<name>` for every task (its objective's `summarize`: accuracy, f1, ppl, ...),
plus `train/loss` and `eval/loss`, the weighted sums.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from lm.data import mixture as mix
from lm.models.config import ModelConfig
from lm.objectives.base import Batch, Data, Metrics, Objective

HEADS = "heads"
# Root names of the shared stack: an encoder task's `encoder`, a decoder's own modules, and
# (encoder-decoder models) `decoder`. Everything else at the root is a task's head.
_BACKBONE = re.compile(r"^(encoder|decoder|embedder|layers|layer_\d+|final_norm|relative_bias)$")


def is_backbone(key: str) -> bool:
    return bool(_BACKBONE.match(key))


def task_names(config: ConfigDict) -> list[str]:
    """The tasks in name order (ConfigDict sorts its keys): the order that fixes the draw
    and the init keys."""
    return list(config.tasks.keys())


def task_config(config: ConfigDict, name: str, batch_size: int | None = None) -> ConfigDict:
    """The single-task config of task `name`: the mixture's, with the task's objective and
    data (and `batch_size` rows per batch)."""
    task = config.tasks[name]
    out = ConfigDict({k: copy.deepcopy(config[k]) for k in config.keys() if k != "tasks"})
    out.objective = task.objective
    out.data = copy.deepcopy(task.data)
    if batch_size is not None:
        out.train.batch_size = batch_size
    return out


class MixtureModel:
    """The tasks' own models (one per task, same model config); parameters are shared by
    the objective's layout (see the module docstring), not by the modules."""

    def __init__(self, cfg: ModelConfig, models: dict[str, Any]):
        self.cfg, self.models = cfg, models


class Mixture(Objective):
    """Batches: the tasks' batches with keys `<task>/<field>` (lm.data.mixture)."""

    def __init__(self, config: ConfigDict):
        super().__init__(config)
        from lm import config_check, objectives  # noqa: PLC0415 (the registry imports us)

        config_check.check_tasks(config)  # a bad task fails here, before any data or compute
        self.names = task_names(config)
        self.weights = {n: float(config.tasks[n].get("weight", 1.0)) for n in self.names}
        self.tasks: dict[str, Objective] = {}
        for name in self.names:
            self.tasks[name] = objectives.get(task_config(config, name))
        data = config.data
        self.mixing = data.get("mixing", "explicit")
        self.batching = data.get("batching", "task")
        self.rates: dict[str, float] | None = None
        self.rows: dict[str, int] = {}
        if self.mixing == "explicit":  # known before the data is read
            self.rates = self._rates({})
        self.tokenizer = None

    # ------------------------------------------------------------------ data
    def _rates(self, examples: dict[str, int]) -> dict[str, float]:
        d = self.config.data
        return mix.mixing_rates(
            self.mixing, self.names, examples=examples,
            rates={n: self.config.tasks[n].get("rate", 1.0) for n in self.names},
            cap=d.get("rate_cap", 0), temperature=d.get("temperature", 1.0))

    def _task_workdir(self, workdir: str, name: str) -> str:
        path = os.path.join(workdir, "tasks", name)
        os.makedirs(path, exist_ok=True)
        return path

    def _build_task(self, name: str, workdir: str, rows: int, process_index: int,
                    process_count: int) -> Data:
        self.tasks[name] = task = type(self.tasks[name])(task_config(self.config, name, rows))
        return task.build_data(self._task_workdir(workdir, name), process_index, process_count)

    def build_data(self, workdir: str, process_index: int, process_count: int) -> Data:
        batch = int(self.config.train.batch_size)
        mesh = self.config.mesh  # rows of a task must split over the batch shards
        devices = mesh.get("num_devices", 0) or jax.device_count()
        multiple = int(np.lcm(max(devices // max(mesh.get("tensor", 1), 1), 1), process_count))
        rows = ({n: batch for n in self.names} if self.batching == "task" or self.rates is None
                else mix.allocate_rows(self.rates, batch, int(multiple)))
        datas = {n: self._build_task(n, workdir, rows[n] or batch, process_index,
                                     process_count) for n in self.names}
        if self.rates is None:
            examples = {}
            for n in self.names:
                count = self.config.tasks[n].get("examples", 0) or datas[n].train_examples
                if not count:
                    raise ValueError(f"tasks.{n}.examples: the number of training examples is "
                                     f"unknown for {self.tasks[n].config.objective!r}; set it")
                examples[n] = int(count)
            self.rates = self._rates(examples)
            if self.batching == "rows":  # rebuild each task's stream at its share of rows
                rows = mix.allocate_rows(self.rates, batch, int(multiple))
                datas = {n: self._build_task(n, workdir, rows[n] or batch, process_index,
                                             process_count) for n in self.names}
        self.rows = rows if self.batching == "rows" else {}
        self.tokenizer = self._shared_tokenizer({n: d.tokenizer for n, d in datas.items()})
        train_iter = mix.MixtureIterator({n: d.train_iter for n, d in datas.items()},
                                         self.rates, self.config.seed, self.batching, self.rows)

        def eval_batches() -> mix.MixtureEval:
            return mix.MixtureEval({n: d.eval_batches() for n, d in datas.items()})

        total = sum(d.train_examples or 0 for d in datas.values())
        return Data(self.tokenizer, train_iter, eval_batches, total or None)

    def _shared_tokenizer(self, tokenizers: dict[str, Any]) -> Any:
        """The one tokenizer of the shared embedding table: every task's must agree."""
        first = self.names[0]
        ref = tokenizers[first]
        probe = "The quick brown fox, 1996: naïve café!"
        for name in self.names[1:]:
            tok = tokenizers[name]
            ids = range(0, ref.vocab_size, max(ref.vocab_size // 97, 1))
            same = (tok.vocab_size == ref.vocab_size and tok.encode(probe) == ref.encode(probe)
                    and all(tok.decode([i]) == ref.decode([i]) for i in ids))
            if not same:
                raise ValueError(
                    f"tasks.{name}.data: its tokenizer differs from task {first}'s; tasks "
                    "share one embedding table, so give them one vocabulary (the same "
                    "data.tokenizer and data.tokenizer_path)")
        return ref

    def model_overrides(self, data: Data) -> dict[str, Any]:
        return {"vocab_size": data.tokenizer.vocab_size}

    def load_inference(self, workdir: str) -> None:
        """Each task's tokenizer / labels from workdir/tasks/<name> (for prediction)."""
        for name, task in self.tasks.items():
            if hasattr(task, "load_inference"):
                task.load_inference(os.path.join(workdir, "tasks", name))
                self.tokenizer = self.tokenizer or task.tokenizer
        if self.tokenizer is None:
            raise ValueError("tasks: no task of this mixture has prediction")

    # ------------------------------------------------------------------ model and params
    def build_model(self, model_cfg: ModelConfig) -> MixtureModel:
        return MixtureModel(model_cfg, {n: t.build_model(model_cfg)
                                        for n, t in self.tasks.items()})

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name, task in self.tasks.items():
            out.update(mix.prefix(name, task.dummy_batch(batch_size)))
        return out

    def init(self, model: MixtureModel, rng: jax.Array, batch: Batch) -> Any:
        backbone, heads = None, {}
        for i, name in enumerate(self.names):
            task = self.tasks[name]
            key = rng if i == 0 else jax.random.fold_in(rng, i)
            params = task.init(model.models[name], key, task.dummy_batch(1))["params"]
            own = {k: v for k, v in params.items() if is_backbone(k)}
            head = {k: v for k, v in params.items() if not is_backbone(k)}
            if head:  # a causal LM with tied embeddings has none
                heads[name] = head
            if backbone is None:
                backbone = own
            elif _signature(own) != _signature(backbone):
                raise ValueError(
                    f"tasks.{name}: its model's backbone differs from task {self.names[0]}'s "
                    f"({sorted(own)} vs {sorted(backbone)}): tasks must share one stack "
                    "(e.g. data.backbone='decoder' for classification beside a causal LM)")
        return {"params": {**backbone, HEADS: heads} if heads else backbone}

    def task_params(self, params: Any, name: str) -> dict[str, Any]:
        """Task `name`'s parameters in its single-task layout (backbone + its head)."""
        return {**{k: v for k, v in params.items() if k != HEADS},
                **params.get(HEADS, {}).get(name, {})}

    def task_view(self, model: MixtureModel, params: Any, name: str | None
                  ) -> tuple[Objective, Any, dict[str, Any]]:
        """(task objective, its model, its params) for prediction with `--task NAME`."""
        task = self.check_task(name)
        return task, model.models[name], self.task_params(params, name)

    def check_task(self, name: str | None) -> Objective:
        """The objective of task `name`, which must exist and predict."""
        if not name:
            raise ValueError(f"--task: required for a mixture run; tasks: {', '.join(self.names)}")
        if name not in self.tasks:
            raise ValueError(f"--task: unknown task {name!r}; tasks: {', '.join(self.names)}")
        task = self.tasks[name]
        if not hasattr(task, "predict"):
            raise ValueError(f"--task: task {name!r} ({task.config.objective}) has no prediction")
        return task

    # ------------------------------------------------------------------ loss and metrics
    def metrics(self, model: MixtureModel, params: Any, batch: Batch, rng: jax.Array | None,
                train: bool) -> Metrics:
        present = mix.split(batch, self.names)
        out: Metrics = {}
        loss = jnp.zeros((), jnp.float32)
        for i, name in enumerate(self.names):
            task, sub_model = self.tasks[name], model.models[name]
            p = self.task_params(params, name)
            if name not in present:
                if not train:  # eval sums need one structure over batches: zero counts
                    shapes = jax.eval_shape(
                        lambda p, b, t=task, m=sub_model: t.metrics(m, p, b, None, False),
                        p, task.dummy_batch(1))
                    out.update(mix.prefix(name, jax.tree.map(
                        lambda s: jnp.zeros(s.shape, s.dtype), shapes)))
                continue
            key = rng if rng is None or len(self.names) == 1 else jax.random.fold_in(rng, i)
            m = task.metrics(sub_model, p, present[name], key, train)
            total, count = m["loss"]
            loss = loss + self.weights[name] * (total / jnp.maximum(count, 1.0))
            out.update(mix.prefix(name, m))
        out["loss"] = (loss, jnp.ones((), jnp.float32))
        return out

    def summarize(self, sums: dict[str, tuple[Any, Any]], prefix: str) -> dict[str, float]:
        """Each task's own summary under `<prefix>/<task>/`, and `<prefix>/loss`, the
        weighted sum of the tasks' mean losses."""
        out: dict[str, float] = {}
        loss = 0.0
        for name, sub in mix.split(sums, self.names).items():
            summary = self.tasks[name].summarize(sub, f"{prefix}/{name}")
            out.update(summary)
            loss += self.weights[name] * summary.get(f"{prefix}/{name}/loss", 0.0)
        out[f"{prefix}/loss"] = loss
        return out

    # ------------------------------------------------------------------ throughput
    def _shares(self) -> dict[str, float]:
        """Rows of a step per task, as fractions of train.batch_size (expected, for 'task')."""
        if self.rows:
            batch = sum(self.rows.values())
            return {n: r / batch for n, r in self.rows.items()}
        if self.rates is not None:
            return dict(self.rates)
        return {n: 1.0 / len(self.names) for n in self.names}

    def tokens_per_example(self) -> int:
        return max(int(round(sum(s * self.tasks[n].tokens_per_example()
                                 for n, s in self._shares().items()))), 1)

    def flops_per_token(self, model_cfg: ModelConfig) -> float:
        shares = self._shares()
        tokens = {n: s * self.tasks[n].tokens_per_example() for n, s in shares.items()}
        total = sum(tokens.values()) or 1.0
        return sum(t / total * self.tasks[n].flops_per_token(model_cfg)
                   for n, t in tokens.items())


def _signature(tree: Any) -> Any:
    import flax.linen as nn  # noqa: PLC0415

    return jax.tree.structure(nn.unbox(tree)), [
        tuple(x.shape) for x in jax.tree.leaves(nn.unbox(tree))]
