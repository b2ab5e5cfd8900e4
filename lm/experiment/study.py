"""Study declarations and their expansion into runs.

A study (`experiments/NAME/study.py`, `get_study() -> Study`) is one or more *stages*; each
stage is a base config (`configs/X.py:variant` + overrides), axes over config fields and
seeds. A stage with `init_from="pretrain"` gets one group of runs per run of that earlier
stage, each initialised from it (`config.init_from` = the parent's workdir).

Expansion resolves every run's config in-process (the config file's `get_config`, the
overrides applied to the locked ConfigDict, then `lm.config_check.validate`), so a misspelt
field or an ill-typed or out-of-range value fails before anything is launched, naming the
axis. A run's identity is a hash of its resolved config (and its parent's identity), so a
relaunch of an edited study knows which runs were added, removed or changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from ml_collections import ConfigDict

from lm import config_check
from lm.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Grid:
    """Cartesian product over each field's values: Grid({"model.position": [...], ...})."""

    values: Mapping[str, Sequence[Any]]


@dataclasses.dataclass(frozen=True)
class Zip:
    """Fields that change together (value i of every field forms setting i). `name` and
    `labels` name the settings in run names (default: the first field's values)."""

    values: Mapping[str, Sequence[Any]]
    name: str | None = None
    labels: Sequence[str] | None = None


Axis = Grid | Zip
CONFIG_AXIS = "config"  # an axis over whole config files: {"config": ["configs/a.py:x", ...]}


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    config: str  # "configs/X.py:variant", relative to the project root
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    axes: Sequence[Axis] = ()
    seeds: Sequence[int] = (0,)
    init_from: str | None = None  # an earlier stage: each of its runs seeds runs here


@dataclasses.dataclass(frozen=True)
class Report:
    metric: str = "eval/loss"
    mode: Literal["last", "best"] = "last"  # value at the last step, or the best over eval steps
    goal: Literal["min", "max"] = "min"
    stages: Sequence[str] = ()  # stages in the table (default: the last one)


# An analysis adds to the report: (results, output dir) -> markdown (it may write plots).
Analysis = Callable[[Any, str], str]


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    stages: Sequence[Stage]
    report: Report = Report()  # noqa: RUF009 (frozen, so one shared default is fine)
    question: str = ""
    analyses: Sequence[Analysis] = ()


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run: `python -m lm.main --config=CONFIG --workdir=SWEEP/STAGE/NAME ..."""

    stage: str
    name: str  # 'position=rope,seed=1' (readable, stable across launches)
    setting: tuple[tuple[str, str], ...]  # axis label -> value label, seeds excluded
    seed: int
    config: str  # "configs/X.py:variant"
    overrides: tuple[tuple[str, Any], ...]  # every --config.a.b=value, seed included
    parent: str | None  # key of the run this one starts from
    id: str  # hash of the resolved config (+ the parent's id)
    resolved: Mapping[str, Any] = dataclasses.field(compare=False, repr=False)

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.name}"

    @property
    def final_step(self) -> int:
        return int(self.resolved["train"]["steps"])


# ------------------------------------------------------------------------ loading


def load_study(path: str) -> tuple[Study, str]:
    """(the Study of experiments/NAME (or its study.py), the project root)."""
    path = os.path.abspath(path)
    file = path if path.endswith(".py") else os.path.join(path, "study.py")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: no study file (experiments/NAME/study.py)")
    study_dir = os.path.dirname(file)
    root = os.path.dirname(os.path.dirname(study_dir))
    module = _import_file(file, "lm_study_" + os.path.basename(study_dir))
    if not hasattr(module, "get_study"):
        raise ValueError(f"{file}: defines no get_study()")
    study = module.get_study()
    if not isinstance(study, Study):
        raise ValueError(f"{file}: get_study() returned {type(study).__name__}, not a Study")
    return study, root


def _import_file(file: str, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ValueError(f"{file}:{e.lineno}: {e.msg}") from None
    return module


_CONFIG_CACHE: dict[tuple[str, str], ConfigDict] = {}


def base_config(spec: str, root: str) -> ConfigDict:
    """`configs/X.py:arg` (relative to `root`) -> a fresh, locked ConfigDict."""
    file, _, arg = spec.partition(":")
    path = file if os.path.isabs(file) else os.path.join(root, file)
    if not os.path.isfile(path):
        raise ConfigError(f"config: {spec}: no such config file ({path})")
    key = (path, arg)
    if key not in _CONFIG_CACHE:
        module = _import_file(path, "lm_config_" + os.path.basename(path)[:-3])
        try:
            _CONFIG_CACHE[key] = module.get_config(arg or None)
        except (ValueError, KeyError) as e:
            raise ConfigError(f"config: {spec}: {e}") from None
    config = ConfigDict(_CONFIG_CACHE[key].to_dict(preserve_field_references=True))
    config.lock()
    return config


def apply_override(config: ConfigDict, field: str, value: Any, where: str) -> None:
    """Sets config.<field> = value through the locked ConfigDict's type checks."""
    *parents, leaf = field.split(".")
    node = config
    try:
        for part in parents:
            node = node[part]
        if not isinstance(node, ConfigDict) or leaf not in node:
            raise KeyError(leaf)
        node[leaf] = value
    except (KeyError, AttributeError):
        raise ConfigError(f"{where}: {field} is not a config field") from None
    except TypeError as e:
        raise ConfigError(f"{where}: {field}={value!r} has the wrong type ({e})") from None


# ---------------------------------------------------------------------- expansion


def _label(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    if "/" in text:  # paths: their last part
        text = os.path.basename(text.rstrip("/")) or text
    return text.replace(",", "+").replace("=", "~").replace(" ", "")


def _axis_settings(axis: Axis) -> list[list[tuple[str, str, dict[str, Any]]]]:
    """Per axis, its settings as (label name, value label, {field: value})."""
    if isinstance(axis, Grid):
        out = []
        for field, values in axis.values.items():
            name = field.rsplit(".", 1)[-1]
            out.append([(name, _label(v), {field: v}) for v in values])
        return out
    lengths = {f: len(v) for f, v in axis.values.items()}
    if len(set(lengths.values())) != 1:
        raise ConfigError(f"axis Zip({', '.join(axis.values)}): fields have different numbers "
                          f"of values {lengths}")
    fields = list(axis.values)
    n = lengths[fields[0]]
    labels = list(axis.labels) if axis.labels is not None else [
        _label(v) for v in axis.values[fields[0]]]
    if len(labels) != n:
        raise ConfigError(f"axis Zip({', '.join(fields)}): {len(labels)} labels for {n} settings")
    name = axis.name or fields[0].rsplit(".", 1)[-1]
    return [[(name, labels[i], {f: axis.values[f][i] for f in fields}) for i in range(n)]]


def stage_settings(stage: Stage) -> list[tuple[tuple[tuple[str, str], ...], dict[str, Any]]]:
    """All (setting labels, overrides) of a stage's axes, in declaration order."""
    per_axis: list[list[tuple[str, str, dict[str, Any]]]] = []
    for axis in stage.axes:
        per_axis.extend(_axis_settings(axis))
    names = [choices[0][0] for choices in per_axis if choices]
    if len(set(names)) != len(names):
        raise ConfigError(f"stage {stage.name}: two axes share the name in {names}; give a Zip "
                          "a name")
    out = []
    for combo in itertools.product(*per_axis):
        labels = tuple((name, label) for name, label, _ in combo)
        overrides: dict[str, Any] = {}
        for _, _, fields in combo:
            overrides.update(fields)
        out.append((labels, overrides))
    return out


def _identity(resolved: Mapping[str, Any], stage: str, parent_id: str | None) -> str:
    blob = json.dumps({"stage": stage, "config": resolved, "parent": parent_id},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def expand(study: Study, root: str, sweep_dir: str) -> list[Run]:
    """Every run of the study, parents before children, names stable across launches."""
    if not study.stages:
        raise ConfigError(f"study {study.name}: no stages")
    runs: list[Run] = []
    by_stage: dict[str, list[Run]] = {}
    for stage in study.stages:
        if stage.name in by_stage:
            raise ConfigError(f"study {study.name}: two stages named {stage.name!r}")
        if stage.init_from is not None and stage.init_from not in by_stage:
            raise ConfigError(f"stage {stage.name}: init_from={stage.init_from!r} is not an "
                              f"earlier stage (have {sorted(by_stage)})")
        parents = by_stage[stage.init_from] if stage.init_from else [None]
        settings = stage_settings(stage)
        bases: dict[str, ConfigDict] = {}
        for _, overrides in settings:
            spec = overrides.get(CONFIG_AXIS, stage.config)
            if spec not in bases:
                bases[spec] = base_config(spec, root)
                for field, value in stage.overrides.items():
                    apply_override(bases[spec], field, value, f"stage {stage.name}: override")
        stage_runs = []
        for parent in parents:
            for labels, overrides in settings:
                base = bases[overrides.get(CONFIG_AXIS, stage.config)]
                for seed in stage.seeds:
                    stage_runs.append(_make_run(study, stage, base, parent, labels, overrides,
                                                seed, sweep_dir))
        names = [r.name for r in stage_runs]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ConfigError(f"stage {stage.name}: two runs would be named {dup!r} (axis "
                              "values with the same label; give a Zip labels)")
        by_stage[stage.name] = stage_runs
        runs.extend(stage_runs)
    return runs


def _make_run(study: Study, stage: Stage, base: ConfigDict, parent: Run | None,
              labels: tuple[tuple[str, str], ...], overrides: Mapping[str, Any], seed: int,
              sweep_dir: str) -> Run:
    config = ConfigDict(base.to_dict(preserve_field_references=True))
    config.lock()
    spec = overrides.get(CONFIG_AXIS, stage.config)
    overrides = {k: v for k, v in overrides.items() if k != CONFIG_AXIS}
    for field, value in overrides.items():
        axis = field.rsplit(".", 1)[-1]
        apply_override(config, field, value, f"stage {stage.name}: axis {axis}")
    apply_override(config, "seed", seed, f"stage {stage.name}: seeds")
    every: dict[str, Any] = {**stage.overrides, **overrides, "seed": seed}
    name_parts = list(labels)
    setting = list(labels)
    if parent is not None:
        parent_dir = os.path.join(sweep_dir, parent.stage, parent.name)
        apply_override(config, "init_from", parent_dir, f"stage {stage.name}: init_from")
        every["init_from"] = parent_dir
        # the parent's name without its own seed (it keeps its ancestors'), then that seed
        inherited = [tuple(part.split("=", 1)) for part in parent.name.split(",")[:-1]]
        inherited.append((f"{parent.stage}_seed", str(parent.seed)))
        clash = {n for n, _ in inherited} & {n for n, _ in labels}
        if clash:
            raise ConfigError(f"stage {stage.name}: axis {sorted(clash)[0]} is also an axis of "
                              f"stage {parent.stage}")
        name_parts = inherited + name_parts
        setting = list(parent.setting) + setting
    try:
        config_check.validate(config)
    except ConfigError as e:
        where = next((f.rsplit(".", 1)[-1] for f in overrides if str(e).startswith(f + ":")),
                     None)
        prefix = f"stage {stage.name}: axis {where}" if where else f"stage {stage.name}"
        raise ConfigError(f"{prefix}: {e}") from None
    name = ",".join(f"{n}={v}" for n, v in name_parts + [("seed", str(seed))])
    resolved = json.loads(json.dumps(config.to_dict(), default=str))
    identity_config = {**resolved, "init_from": parent.id if parent else resolved["init_from"]}
    return Run(stage=stage.name, name=name, setting=tuple(setting), seed=seed,
               config=spec, overrides=tuple(every.items()),
               parent=parent.key if parent else None,
               id=_identity(identity_config, stage.name, parent.id if parent else None),
               resolved=resolved)


# ------------------------------------------------------------------- commands


def format_value(value: Any) -> str:
    """A value as `--config.a.b=` wants it (ml_collections parses it by the field's type)."""
    if isinstance(value, bool | int | str):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return repr(value)


def main_args(run: Run, workdir: str) -> list[str]:
    """The arguments of `python -m lm.main` for one run."""
    args = [f"--config={run.config}", f"--workdir={workdir}"]
    args += [f"--config.{field}={format_value(value)}" for field, value in run.overrides]
    return args


def python() -> str:
    return sys.executable
