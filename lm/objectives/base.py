"""The objective interface: everything the training loop needs to know about a task.

An objective owns its data (batch spec, pipelines), the model it trains, the loss and the
metrics. The loop only ever calls these methods, so a new task is one new file here plus
a config, and the loop stays free of task branches.

Metrics are returned as `{name: (sum, count)}` so that evaluation can aggregate exactly
over uneven batches; the loop reports `sum / count`. The key `"loss"` is the quantity
that is differentiated (its `sum / count`).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from lm.models.config import ModelConfig

Batch = dict[str, Any]
Metrics = dict[str, tuple[jnp.ndarray, jnp.ndarray]]


@dataclasses.dataclass
class Data:
    """What an objective's data builder hands to the loop."""

    tokenizer: Any
    train_iter: Iterator[Batch]  # grain iterator: get_state()/set_state() resume exactly
    eval_batches: Callable[[], Iterable[Batch]]  # a fresh, deterministic pass each call
    train_examples: int | None = None  # training examples (rows) per epoch, where known


class Objective(abc.ABC):
    """Base class; subclasses are registered in `lm.objectives.OBJECTIVES`."""

    def __init__(self, config: ConfigDict):
        self.config = config

    @property
    def eval_batch_size(self) -> int:
        """Rows per evaluation batch: `evals.batch_size`, 0 = the training batch. Evaluation
        is forward-only, so larger batches make the validation pass cheaper (fewer calls)."""
        evals = self.config.get("evals", {})
        return int(evals.get("batch_size", 0) or 0) or int(self.config.train.batch_size)

    @abc.abstractmethod
    def build_data(self, workdir: str, process_index: int, process_count: int) -> Data:
        """Tokenizer and train / eval pipelines (each process reads only its shard)."""

    @abc.abstractmethod
    def build_model(self, model_cfg: ModelConfig) -> nn.Module:
        """The network this objective trains."""

    @abc.abstractmethod
    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """A batch of the right shapes and dtypes (for init and ahead-of-time compiles)."""

    @abc.abstractmethod
    def init(self, model: nn.Module, rng: jax.Array, batch: Batch) -> Any:
        """`model.init` on a dummy batch (variables, logically boxed)."""

    @abc.abstractmethod
    def metrics(self, model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None,
                train: bool) -> Metrics:
        """Loss and metrics as (sum, count) pairs; `rng` drives dropout when training."""

    @abc.abstractmethod
    def tokens_per_example(self) -> int:
        """Tokens one example contributes to tokens/s."""

    @abc.abstractmethod
    def flops_per_token(self, model_cfg: ModelConfig) -> float:
        """Training FLOPs per token (for MFU)."""

    def model_overrides(self, data: Data) -> dict[str, Any]:
        """Model fields decided by the data (e.g. vocab size from the tokenizer)."""
        return {}

    def generation_metrics(self, model_cfg: ModelConfig, params: Any) -> dict[str, float]:
        """Scores of generated outputs ({'eval/bleu': ...}), computed every
        `evals.decode_every` steps; objectives that generate nothing return {}."""
        return {}

    # {token-level cross-entropy metric: the name its perplexity is reported under}.
    perplexities: dict[str, str] = {}

    def summarize(self, sums: dict[str, tuple[Any, Any]], prefix: str) -> dict[str, float]:
        """{name: (sum, count)} -> {prefix/name: sum / count}, plus eval perplexities of the
        metrics listed in `perplexities`."""
        out = {f"{prefix}/{name}": float(total) / max(float(count), 1e-9)
               for name, (total, count) in sums.items()}
        if prefix.split("/")[0] == "eval":  # also a mixture's "eval/<task>"
            for name, ppl in self.perplexities.items():
                if f"{prefix}/{name}" in out:
                    out[f"{prefix}/{ppl}"] = float(np.exp(min(out[f"{prefix}/{name}"], 50.0)))
        return out
