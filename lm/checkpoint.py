"""Checkpointing of {train state, data-iterator state, JSON metadata} with orbax.

Layout: ``DIR/checkpoints/<step>/`` holding three orbax items:

* ``state``: the train-state pytree (``ocp.args.StandardSave``; sharded arrays, async).
* ``data``:  the data iterator state (grain ``get_state()``: bytes for ``DataLoader``
  iterators, a dict for ``DatasetIterator``). Each process writes its own
  ``process_<i>-of-<n>.json`` (the file naming grain's own orbax handler uses), because every
  process reads a different shard of the data. The file holds ``{"format", "state"}`` so bytes
  and dicts come back as the type that was saved. Our own small handler is used instead of
  ``grain.checkpoint.CheckpointSave`` because that one wants the live iterator object, while
  this module treats the state as an opaque value captured by the caller at the same step.
* ``meta``:  optional small JSON dict (process 0 writes it).

Saves are atomic: orbax writes into a ``<step>.orbax-checkpoint-tmp*`` directory and renames
it when every item is committed; leftovers from a crashed save are never listed as steps and
are removed when the next `Checkpointer` opens the directory.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

DataState = bytes | dict[str, Any]

_STATE, _DATA, _META = "state", "data", "meta"


def _data_filename() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def _encode_data_state(data_state: DataState) -> dict[str, Any]:
    if isinstance(data_state, bytes | bytearray):
        try:
            return {"format": "utf8", "state": bytes(data_state).decode("utf-8")}
        except UnicodeDecodeError:
            return {"format": "base64", "state": base64.b64encode(data_state).decode("ascii")}
    if isinstance(data_state, Mapping):
        return {"format": "json", "state": dict(data_state)}
    raise TypeError(
        f"data_state must be bytes or a JSON-able dict, got {type(data_state).__name__}"
    )


def _decode_data_state(blob: Mapping[str, Any]) -> DataState:
    fmt, state = blob["format"], blob["state"]
    if fmt == "utf8":
        return state.encode("utf-8")
    if fmt == "base64":
        return base64.b64decode(state)
    if fmt == "json":
        return state
    raise ValueError(f"unknown data-state format {fmt!r}")


class DataStateHandler(ocp.CheckpointHandler):
    """Orbax handler for an opaque per-process data-iterator state (bytes or dict).

    Synchronous on purpose: the state is a few hundred bytes, written while the array save
    continues in the background.
    """

    def save(self, directory: epath.Path, args: DataStateSave) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        blob = _encode_data_state(args.data_state)
        (directory / _data_filename()).write_text(json.dumps(blob))

    def restore(self, directory: epath.Path, args: DataStateRestore | None = None) -> DataState:
        path = directory / _data_filename()
        if not path.exists():
            found = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
            raise FileNotFoundError(
                f"no data-iterator state {path} for this process (found {found}); "
                "was the checkpoint written with a different process count?"
            )
        return _decode_data_state(json.loads(path.read_text()))

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    data_state: DataState


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with each array's sharding) for a concrete state: a restore target."""

    def leaf(x: Any) -> Any:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(leaf, tree)


def _preservation_kwargs(max_to_keep: int) -> dict[str, Any]:
    """Keep the last N steps: `preservation_policy` where this orbax has it, else max_to_keep."""
    managers = getattr(ocp, "checkpoint_managers", None)
    latest_n = getattr(managers, "LatestN", None)
    fields = {f.name for f in dataclasses.fields(ocp.CheckpointManagerOptions)}
    if latest_n is not None and "preservation_policy" in fields:
        return {"preservation_policy": latest_n(n=max_to_keep)}
    return {"max_to_keep": max_to_keep}


UNREADABLE = ".unreadable"  # suffix of a damaged step directory, kept beside the others


class DiskFull(OSError):
    """The workdir's disk cannot hold the next checkpoint."""


def _nbytes(tree: Any) -> int:
    return sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(tree))


class CheckpointMismatch(ValueError):
    """The checkpoint holds another model's parameters (the run's config changed)."""


class Checkpointer:
    """Periodic, atomic, optionally async checkpoints under ``directory/checkpoints``.

    `save` returns once device arrays are copied to host; writing continues in a background
    thread when ``async_save``. Call `wait` before reading the files, and `close` at exit.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_to_keep: int,
        save_every: int,
        async_save: bool = True,
    ) -> None:
        if max_to_keep < 1:
            raise ValueError(f"checkpoint.max_to_keep must be >= 1, got {max_to_keep}")
        if save_every < 1:
            raise ValueError(f"checkpoint.save_every must be >= 1, got {save_every}")
        self.directory = epath.Path(os.path.abspath(os.fspath(directory))) / "checkpoints"
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            # We decide when to save (see `save`); orbax saves whatever it is asked to.
            save_interval_steps=1,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
            **_preservation_kwargs(max_to_keep),
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        """Committed steps, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """Last committed step, or None when there is no checkpoint."""
        return self._manager.latest_step()

    def should_save(self, step: int, *, force: bool = False) -> bool:
        return (force or step % self.save_every == 0) and step not in self._manager.all_steps()

    def save(
        self,
        step: int,
        state: Any,
        data_state: DataState | None,
        *,
        force: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        """Save when ``step % save_every == 0`` or ``force``; returns whether a save started.

        A step that is already committed is never saved again (e.g. a final forced save
        right after a periodic one). ``data_state`` may be None (no data item is written).
        """
        if not self.should_save(step, force=force):
            return False
        items: dict[str, ocp.args.CheckpointArgs] = {_STATE: ocp.args.StandardSave(state)}
        if data_state is not None:
            items[_DATA] = DataStateSave(data_state)
        if metadata is not None:
            items[_META] = ocp.args.JsonSave(dict(metadata))
        self.wait()  # an earlier async save still holds space (and may have failed)
        self._check_space(step, state)
        try:
            return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise self._disk_full(step, _nbytes(state)) from None
            raise

    def _check_space(self, step: int, state: Any) -> None:
        """Refuses a save the disk cannot hold, before a byte is written: a full disk stops
        the run with one line, and the previous checkpoint stays whole."""
        need = _nbytes(state)
        if shutil.disk_usage(self.directory).free < need * 1.1 + (1 << 20):
            raise self._disk_full(step, need)

    def _disk_full(self, step: int, need: int) -> DiskFull:
        free = shutil.disk_usage(self.directory).free
        latest = self.latest_step()
        kept = f"the last checkpoint, step {latest}, is intact" if latest else "no checkpoint yet"
        return DiskFull(f"--workdir: {self.directory.parent}: no space for the checkpoint of "
                        f"step {step}: {free / 2**20:.1f} MiB free, about "
                        f"{(need * 1.1 + (1 << 20)) / 2**20:.1f} MiB needed ({kept})")

    def _resolve_step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint found in {self.directory}")
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}"
            )
        return step

    def _items(self, step: int) -> set[str]:
        return {p.name for p in (self.directory / str(step)).iterdir() if p.is_dir()}

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, DataState | None]:
        """Restore (state, data_state) of ``step`` (None = latest).

        ``abstract_state`` is a tree of `jax.ShapeDtypeStruct` with shardings (see
        `abstract_like`): it fixes the pytree types (optax NamedTuples would otherwise come
        back as dicts) and where each array lands, so restoring onto another mesh works.
        ``data_state`` is None when the checkpoint has none.
        """
        self.wait()
        step = self._resolve_step(step)
        items: dict[str, ocp.args.CheckpointArgs] = {
            _STATE: ocp.args.StandardRestore(abstract_state)
        }
        has_data = _DATA in self._items(step)
        if has_data:
            items[_DATA] = DataStateRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except ValueError as e:
            problem = self._mismatch(step, abstract_state)
            if problem is None:
                raise
            raise CheckpointMismatch(
                f"{self.directory / str(step)}: the checkpoint does not match this run's model "
                f"({problem}); the config changed since it was saved: restore the old config "
                "or use a new --workdir") from e
        return restored[_STATE], (restored[_DATA] if has_data else None)

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, DataState | None] | None:
        """(step, state, data_state) of the newest readable checkpoint, or None if none.

        A checkpoint that cannot be read (files damaged or cut short) is logged with its
        step and the reason, renamed `STEP.unreadable` (kept for inspection, never deleted,
        and no longer a step) and the one before it is tried. A checkpoint of another model
        (the config changed) is not damage: CheckpointMismatch propagates."""
        for step in reversed(self.all_steps()):
            try:
                state, data_state = self.restore(step, abstract_state)
                return step, state, data_state
            except CheckpointMismatch:
                raise
            except Exception as e:  # noqa: BLE001 (any failure to read is damage here)
                why = " ".join(str(e).split())[:300] or type(e).__name__
                src = self.directory / str(step)
                dst = self.directory / f"{step}{UNREADABLE}"
                logging.warning("checkpoint step %d in %s is unreadable (%s): kept as %s; "
                                "falling back to the previous checkpoint", step,
                                self.directory, why, dst.name)
                if jax.process_index() == 0:
                    os.rename(src, dst)
                if jax.process_count() > 1:
                    multihost_utils.sync_global_devices(f"lm_unreadable_{step}")
                self._manager.reload()
        return None

    def _mismatch(self, step: int, abstract_state: Any) -> str | None:
        """The first parameter whose presence or shape differs between the checkpoint of
        `step` and `abstract_state` ('params/layer_2/... is new'), or None."""
        handler = ocp.PyTreeCheckpointHandler()
        try:
            meta = handler.metadata(self.directory / str(step) / _STATE)
        except (OSError, ValueError):
            return None
        finally:
            handler.close()

        def shapes(tree: Any) -> dict[str, tuple]:
            flat = jax.tree_util.tree_flatten_with_path(tree)[0]
            return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path):
                    tuple(getattr(leaf, "shape", ())) for path, leaf in flat}

        saved = shapes(getattr(meta, "tree", meta).get("params", {}))
        wanted = shapes(getattr(abstract_state, "params", {}))
        for name in sorted(set(saved) | set(wanted)):
            if name not in saved:
                return f"params/{name} {list(wanted[name])} is new"
            if name not in wanted:
                return f"params/{name} {list(saved[name])} is in the checkpoint only"
            if saved[name] != wanted[name]:
                return f"params/{name} is {list(saved[name])} there, {list(wanted[name])} now"
        return None

    def read_metadata(self, step: int | None = None) -> dict[str, Any] | None:
        """The JSON metadata saved with ``step`` (None = latest), or None if there is none."""
        self.wait()
        step = self._resolve_step(step)
        if _META not in self._items(step):
            return None
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored[_META])

    def wait(self) -> None:
        """Block until the in-flight async save (if any) is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves/deletions and release orbax's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
