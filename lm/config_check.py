"""One place that checks a whole experiment config before anything is built or launched.

`validate(config)` walks a table of field rules (ranges and choices) and raises
`ConfigError("field.path: what is wrong")` for the first bad value. Rules apply only to
fields the config has, so objective-specific fields (`data.mask_prob`, `data.labels`, ...)
are checked wherever they appear, without one check per objective. `lm.main` and
`lm.experiment` both call it, so a study fails on a bad axis value before any run starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from lm.errors import ConfigError

Check = Callable[[Any], str | None]  # value -> None when fine, else what is wrong


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def positive(value: Any) -> str | None:
    if not _number(value) or not math.isfinite(value) or value <= 0:
        return f"must be a positive number, got {value!r}"
    return None


def non_negative(value: Any) -> str | None:
    if not _number(value) or not math.isfinite(value) or value < 0:
        return f"must be >= 0, got {value!r}"
    return None


def at_least(low: float) -> Check:
    def check(value: Any) -> str | None:
        if not _number(value) or value < low:
            return f"must be >= {low}, got {value!r}"
        return None

    return check


def interval(low: float, high: float, *, closed_high: bool = False) -> Check:
    """low <= value < high (or <= high)."""

    def check(value: Any) -> str | None:
        ok = _number(value) and low <= value and (value <= high if closed_high else value < high)
        if not ok:
            bracket = "]" if closed_high else ")"
            return f"must lie in [{low}, {high}{bracket}, got {value!r}"
        return None

    return check


def one_of(*choices: Any) -> Check:
    def check(value: Any) -> str | None:
        if value not in choices:
            return f"{value!r} is not one of {', '.join(map(str, choices))}"
        return None

    return check


def _objectives(value: Any) -> str | None:
    from lm.objectives import OBJECTIVES  # noqa: PLC0415 (avoids an import cycle)

    return one_of(*sorted(OBJECTIVES))(value)


def _mesh_axis(value: Any) -> str | None:
    if not isinstance(value, int) or (value < 1 and value != -1):
        return f"must be a positive device count or -1 (the remaining devices), got {value!r}"
    return None


def _dtype(value: Any) -> str | None:
    import jax.numpy as jnp  # noqa: PLC0415 (jax is imported late, after flag parsing)

    try:
        jnp.dtype(value)
    except TypeError:
        return f"unknown dtype {value!r}"
    return None


RULES: dict[str, Check] = {
    "seed": non_negative,
    "objective": _objectives,
    # model (the ModelConfig dataclass checks shapes once the vocabulary is known)
    "model.d_model": positive,
    "model.num_layers": positive,
    "model.num_heads": positive,
    "model.mlp_dim": positive,
    "model.max_len": positive,
    "model.vocab_size": non_negative,  # 0: taken from the tokenizer
    "model.dropout_rate": interval(0.0, 1.0),
    "model.attention_dropout_rate": interval(0.0, 1.0),
    "model.position": one_of("learned", "sinusoidal", "rope", "relative", "none"),
    "model.norm": one_of("layernorm", "rmsnorm"),
    "model.activation": one_of("gelu", "gelu_tanh", "relu", "swiglu", "geglu",
                                       "geglu_tanh"),
    "model.attention_impl": one_of("einsum", "xla", "cudnn"),
    "model.remat": one_of("none", "full", "dots", "dots_no_batch"),
    "model.dtype": _dtype,
    "model.param_dtype": _dtype,
    "model.init_std": positive,
    "model.norm_eps": positive,
    "model.rope_theta": positive,
    # data
    "data.seq_len": at_least(2),
    "data.val_fraction": interval(0.0, 1.0),
    "data.vocab_size": non_negative,
    "data.tokenizer": one_of("char", "byte", "bpe", "sentencepiece", "wordpiece"),
    "data.pack": one_of("chunk", "documents"),
    "data.train_stride": non_negative,
    "data.worker_count": non_negative,
    "data.mask_prob": interval(0.0, 1.0),
    "data.max_predictions": at_least(1),
    "data.nsp_mode": one_of("nsp", "sop", "none"),
    "data.nsp_weight": non_negative,
    "data.short_seq_prob": interval(0.0, 1.0, closed_high=True),
    "data.dupe_factor": at_least(1),
    "data.val_split": one_of("random", "sentences"),
    "data.val_size": non_negative,
    "data.inputs_length": at_least(2),
    "data.targets_length": at_least(2),
    "data.noise_density": interval(0.0, 1.0),
    "data.mean_span_length": at_least(1),
    "data.extra_ids": non_negative,
    "data.backbone": one_of("encoder", "decoder"),
    # task mixtures (lm.objectives.mixture; per-task fields are checked by check_tasks)
    "data.mixing": one_of("explicit", "examples", "temperature"),
    "data.batching": one_of("task", "rows"),
    "data.rate_cap": non_negative,
    "data.temperature": positive,
    # optimizer
    "optim.name": one_of("adamw"),
    "optim.lr": positive,
    "optim.end_lr": non_negative,
    "optim.schedule": one_of("cosine", "linear", "constant"),
    "optim.warmup_steps": non_negative,
    "optim.decay_steps": non_negative,
    "optim.b1": interval(0.0, 1.0),
    "optim.b2": interval(0.0, 1.0),
    "optim.eps": positive,
    "optim.weight_decay": non_negative,
    "optim.grad_clip": non_negative,
    "optim.grad_accum_steps": at_least(1),
    # mesh
    "mesh.data": _mesh_axis,
    "mesh.fsdp": _mesh_axis,
    "mesh.tensor": _mesh_axis,
    "mesh.rules": one_of("dp", "fsdp", "fsdp_tp"),
    "mesh.num_devices": non_negative,
    # training
    "train.steps": at_least(1),
    "train.batch_size": at_least(1),
    "train.log_every": at_least(1),
    "train.eval_every": at_least(1),
    "train.checkpoint_every": at_least(1),
    "train.keep_checkpoints": at_least(1),
    "train.preemption_sync_every": at_least(1),
    "train.loss_chunk": at_least(-1),
    "train.profile_start": non_negative,
    "train.profile_steps": non_negative,
    "train.steps_per_call": at_least(1),
    "train.label_smoothing": interval(0.0, 1.0),
    "evals.max_batches": non_negative,
    "evals.batch_size": non_negative,
    "evals.decode_every": non_negative,
    "evals.decode_examples": non_negative,
    "evals.beam_size": at_least(1),
    "evals.length_penalty": non_negative,
}


def _lookup(config: Mapping[str, Any], path: str) -> tuple[bool, Any]:
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _check_rules(values: Mapping[str, Any], prefix: str = "") -> None:
    for path, check in RULES.items():
        present, value = _lookup(values, path)
        if present:
            problem = check(value)
            if problem:
                raise ConfigError(f"{prefix}{path}: {problem}")


def _has_validation(data: Mapping[str, Any]) -> bool:
    """A validation file, a catalogue split, or a split carved from the training data
    (val_size, else val_fraction, whose default in every objective is > 0)."""
    return bool(data.get("val_path") or data.get("tfds_name") or data.get("val_size")
                or data.get("val_fraction", 0.1))


def check_tasks(config: Any) -> None:
    """A mixture's tasks (lm.objectives.mixture): each names a known objective, passes the
    field rules under `tasks.<name>.`, has validation data and a rate and weight >= 0; the
    explicit rates are not all 0. Raises ConfigError naming the task."""
    from lm.objectives import OBJECTIVES  # noqa: PLC0415 (avoids an import cycle)

    values = config.to_dict() if hasattr(config, "to_dict") else config
    tasks = values.get("tasks") or {}
    if not tasks:
        raise ConfigError("tasks: a mixture needs at least one task in config.tasks")
    known = sorted(set(OBJECTIVES) - {"mixture"})
    for name, task in tasks.items():
        kind = task.get("objective", "")
        if kind not in known:
            raise ConfigError(f"tasks.{name}.objective: unknown task objective {kind!r}; "
                              f"known: {', '.join(known)}")
        _check_rules({"data": task.get("data") or {}}, f"tasks.{name}.")
        if not _has_validation(task.get("data") or {}):
            raise ConfigError(f"tasks.{name}.data: task {name!r} has no validation data (set "
                              "val_path, val_size or val_fraction > 0): evaluation runs "
                              "every task's validation set")
        for field in ("rate", "weight", "examples"):
            if field in task:
                problem = non_negative(task[field])
                if problem:
                    raise ConfigError(f"tasks.{name}.{field}: {problem}")
    mixing = (values.get("data") or {}).get("mixing", "explicit")
    if mixing == "explicit" and all(t.get("rate", 1.0) == 0 for t in tasks.values()):
        raise ConfigError(f"tasks: every task's rate is 0 ({', '.join(tasks)}); nothing to "
                          "sample")


def validate(config: Any) -> None:
    """Raises ConfigError naming the first field whose value is out of range or not allowed."""
    values = config.to_dict() if hasattr(config, "to_dict") else config
    _check_rules(values)
    every = _lookup(values, "evals.decode_every")[1]
    eval_every = _lookup(values, "train.eval_every")[1]
    if every and eval_every and every % eval_every:
        raise ConfigError(f"evals.decode_every: {every} must be a multiple of "
                          f"train.eval_every ({eval_every}): outputs are decoded at evaluations")
    if values.get("objective") == "mixture":
        check_tasks(values)
    present, impl = _lookup(values, "model.attention_impl")
    if present and impl == "cudnn":
        import jax  # noqa: PLC0415 (only this check needs the backend)

        if jax.default_backend() != "gpu":
            raise ConfigError(f"model.attention_impl: 'cudnn' needs a GPU; this run's backend "
                              f"is {jax.default_backend()!r} (use 'xla' or 'einsum')")
