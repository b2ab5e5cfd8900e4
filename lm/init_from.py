"""Start a fresh run from another model's parameters (`config.init_from`).

`spec` is one of
  * a run directory of ours (`DIR`, latest step, or `DIR@STEP`): only the params of its
    train state are read (no optimizer state);
  * a converted directory (`python -m lm.convert from-hf SRC DST`: params.safetensors);
  * a Hugging Face model directory (converted on the fly, see `lm.convert.from_hf`).

Parameters are matched by path and shape. A path is looked up as is, then without or with an
`encoder/` prefix, so a BertPretrainer's (or a plain Encoder's) encoder fills the `encoder/`
subtree of a SequenceClassifier / TokenClassifier, and the pooler comes along when both have
one. A task mixture's head `heads/<task>/X` (lm.objectives.mixture) is served by a
single-task model's `X` when the shapes agree (else it keeps its init). Layer layouts may
differ (loop `layer_i` vs scan `layers`). Target parameters without a source keep their
fresh init; source parameters nobody asked for are reported as unused. A
shape mismatch is an error naming the parameter and both shapes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util

from lm.convert import files
from lm.models.transformer import unstack_layers
from lm.rundir import run_steps

_ENCODER = "encoder/"
_HEADS = "heads"  # a task mixture's per-task heads


def parse_spec(spec: str) -> tuple[str, int | None]:
    """'DIR' -> (DIR, None); 'DIR@STEP' -> (DIR, STEP)."""
    path, sep, step = spec.rpartition("@")
    if sep and step.isdigit():
        return os.path.expanduser(path), int(step)
    return os.path.expanduser(spec), None


def read_run_params(run_dir: str, step: int | None = None) -> tuple[dict[str, Any], int]:
    """(params of the train state saved at `step` (None: latest) as numpy, step)."""
    import orbax.checkpoint as ocp

    steps = run_steps(run_dir)
    if not steps:
        raise FileNotFoundError(f"{run_dir}: no checkpoint in {run_dir}/checkpoints")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"{run_dir}: no checkpoint for step {step}; have {steps}")
    path = epath.Path(run_dir) / "checkpoints" / str(step) / "state"
    handler = ocp.PyTreeCheckpointHandler()
    try:
        meta = handler.metadata(path)
        tree = getattr(meta, "tree", meta)
        if "params" not in tree:
            raise ValueError(f"{path}: the saved state has no 'params' (keys: {sorted(tree)})")
        # Partial restore of the params subtree only, as host numpy arrays.
        item = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                                       tree["params"])}
        args = {"params": jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray),
                                       tree["params"])}
        restored = handler.restore(path, args=ocp.args.PyTreeRestore(
            item=item, restore_args=args, partial_restore=True))
    finally:
        handler.close()
    return restored["params"], step


def load_source(spec: str) -> dict[str, np.ndarray]:
    """The parameters `spec` names, flat {"a/b/c": array} in the loop layer layout."""
    path, step = parse_spec(spec)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"init_from: {path} is not a directory")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        params, _ = read_run_params(path, step)
        return files.flatten(unstack_layers(params))
    if step is not None:
        raise ValueError(f"init_from: @{step} applies only to run directories; {path} has no "
                         "checkpoints/")
    if files.is_converted_dir(path):
        flat, _ = files.load_converted(path)
        return files.flatten(unstack_layers(files.unflatten(flat)))
    if files.is_hf_dir(path):
        from lm.convert import from_hf

        _, params, info = from_hf(path)
        return files.flatten({**params, **info.extras})
    raise ValueError(f"init_from: {path} is neither a run directory (checkpoints/), a converted "
                     "directory (params.safetensors) nor a Hugging Face model directory "
                     "(config.json + weights)")


@dataclasses.dataclass
class LoadReport:
    """Target paths loaded / left at their fresh init, and source paths not used."""

    loaded: list[str]
    new: list[str]
    unused: list[str]
    shapes: dict[str, tuple[int, ...]]

    def table(self, source: str) -> str:
        lines = [f"init_from {source}: {len(self.loaded)} loaded, {len(self.new)} newly "
                 f"initialised, {len(self.unused)} unused"]
        for status, names in (("loaded", self.loaded), ("new", self.new),
                              ("unused", self.unused)):
            lines += [f"  {status:<7} {n}  {list(self.shapes[n])}" for n in names]
        return "\n".join(lines)


def _lookup(name: str, source: Mapping[str, np.ndarray]) -> str | None:
    """The source path serving target path `name`: itself, else without / with `encoder/`."""
    alias = name[len(_ENCODER):] if name.startswith(_ENCODER) else _ENCODER + name
    for candidate in (name, alias):
        if candidate in source:
            return candidate
    return None


def _mismatch(spec: str, name: str, want: tuple, got: tuple, src: str) -> ValueError:
    return ValueError(f"init_from {spec}: parameter {name} has shape {want} in the model but "
                      f"{got} in the checkpoint ({src})")


def _place(value: np.ndarray, like: Any) -> Any:
    """`value` as `like`'s dtype, sharded like it when it is a jax.Array (multi-host safe:
    each process fills only its own shards), inside `like`'s logical-axis box if any."""
    if isinstance(like, nn.meta.AxisMetadata):
        return like.replace_boxed(_place(value, like.unbox()))
    value = np.asarray(value, dtype=like.dtype)
    if isinstance(like, jax.Array):
        return jax.make_array_from_callback(value.shape, like.sharding, lambda idx: value[idx])
    return value


def merge(source: Mapping[str, np.ndarray], target: Mapping[str, Any], spec: str = "source"
          ) -> tuple[dict[str, Any], LoadReport]:
    """Target params with every leaf found in `source` (flat, loop layout) replaced."""
    flat_t = traverse_util.flatten_dict(target, sep="/")
    out: dict[str, Any] = {}
    loaded, new, used = [], [], set()
    shapes: dict[str, tuple[int, ...]] = {k: tuple(v.shape) for k, v in source.items()}
    for name in sorted(flat_t):
        leaf = flat_t[name]
        want = tuple(nn.meta.unbox(leaf).shape)
        shapes[name] = want
        parts = name.split("/")
        if "layers" in parts:  # scan layout: one stacked leaf from layer_0..layer_{n-1}
            j = parts.index("layers")
            per_layer = ["/".join([*parts[:j], f"layer_{i}", *parts[j + 1:]])
                         for i in range(want[0])]
            found = [_lookup(n, source) for n in per_layer]
            hits = [f for f in found if f is not None]
            if not hits:
                out[name] = leaf
                new.append(name)
                continue
            if len(hits) < len(found):
                raise _mismatch(spec, name, want, (len(hits), *source[hits[0]].shape),
                                f"only {len(hits)} of {want[0]} layers")
            for f in hits:
                if tuple(source[f].shape) != want[1:]:
                    raise _mismatch(spec, name, want, (len(hits), *source[f].shape), f)
            value = np.stack([source[f] for f in hits])
        else:
            hit = _lookup(name, source)
            if hit is None and parts[0] == _HEADS and len(parts) > 2:
                hit = _lookup("/".join(parts[2:]), source)  # a single-task head
                if hit is not None and tuple(source[hit].shape) != want:
                    hit = None  # another task's head (e.g. another label count)
            if hit is None:
                out[name] = leaf
                new.append(name)
                continue
            if tuple(source[hit].shape) != want:
                raise _mismatch(spec, name, want, tuple(source[hit].shape), hit)
            hits, value = [hit], source[hit]
        out[name] = _place(value, leaf)
        loaded.append(name)
        used.update(hits)
    unused = sorted(set(source) - used)
    params = traverse_util.unflatten_dict(out, sep="/")
    return params, LoadReport(loaded, new, unused, shapes)


def load_params(spec: str, target_params: Mapping[str, Any]) -> dict[str, Any]:
    """`target_params` (a fresh init; its structure, dtypes and shardings are kept) with every
    parameter `spec` provides loaded. Logs the loaded / new / unused table."""
    params, report = merge(load_source(spec), target_params, spec)
    if not report.loaded:
        raise ValueError(f"init_from {spec}: no parameter path matches the model "
                         f"(checkpoint has e.g. {report.unused[:3]})")
    logging.info("%s", report.table(spec))
    return params
