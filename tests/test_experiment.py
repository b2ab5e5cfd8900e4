"""The study layer without training: expansion, validation, identity, report, dry runs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from lm.errors import ConfigError
from lm.experiment import Grid, Report, Stage, Study, Zip, expand, launch, report
from lm.experiment import __main__ as cli
from lm.experiment import state as st

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
CHAR = "configs/char_lm.py:test"


def two_stage_study(**changes) -> Study:
    pretrain = Stage("pretrain", CHAR, overrides={"mesh.num_devices": 1},
                     axes=[Grid({"model.position": ["learned", "rope"]})], seeds=[0, 1])
    finetune = Stage("finetune", CHAR, overrides={"mesh.num_devices": 1},
                     axes=[Zip({"optim.lr": [1e-3, 3e-4], "train.steps": [6, 8]},
                               name="recipe", labels=["fast", "slow"]),
                           Grid({"model.dropout_rate": [0.0]})],
                     seeds=[5], init_from="pretrain")
    stages = changes.pop("stages", [pretrain, finetune])
    return Study(name="demo", stages=stages, report=Report("eval/loss"), **changes)


def test_expansion_equals_golden_list(tmp_path):
    runs = expand(two_stage_study(), str(ROOT), str(tmp_path))
    assert [r.key for r in runs] == [
        "pretrain/position=learned,seed=0",
        "pretrain/position=learned,seed=1",
        "pretrain/position=rope,seed=0",
        "pretrain/position=rope,seed=1",
        *[f"finetune/position={p},pretrain_seed={s},recipe={r},dropout_rate=0,seed=5"
          for p in ("learned", "rope") for s in (0, 1) for r in ("fast", "slow")],
    ]
    ft = runs[4]
    assert ft.parent == "pretrain/position=learned,seed=0"
    assert ft.resolved["init_from"] == str(tmp_path / "pretrain" / "position=learned,seed=0")
    assert ft.resolved["optim"]["lr"] == 1e-3 and ft.resolved["train"]["steps"] == 6
    assert runs[5].resolved["optim"]["lr"] == 3e-4 and runs[5].resolved["train"]["steps"] == 8
    assert ft.resolved["model"]["position"] == "learned"  # the child's own config file's value
    assert ft.setting == (("position", "learned"), ("recipe", "fast"), ("dropout_rate", "0"))
    assert [r.seed for r in runs[:4]] == [0, 1, 0, 1]
    assert runs[1].resolved["seed"] == 1


def test_names_and_ids_are_stable_and_follow_the_config(tmp_path):
    a = expand(two_stage_study(), str(ROOT), str(tmp_path))
    b = expand(two_stage_study(), str(ROOT), str(tmp_path / "elsewhere"))
    assert [r.name for r in a] == [r.name for r in b]
    assert [r.id for r in a] == [r.id for r in b]  # the sweep dir is not part of identity
    study = two_stage_study()
    changed = Stage("pretrain", CHAR, overrides={"mesh.num_devices": 1, "optim.lr": 2e-3},
                    axes=[Grid({"model.position": ["learned", "rope"]})], seeds=[0, 1])
    c = expand(two_stage_study(stages=[changed, study.stages[1]]), str(ROOT), str(tmp_path))
    assert [r.name for r in c] == [r.name for r in a]
    assert all(x.id != y.id for x, y in zip(a, c, strict=True))  # children follow parents


@pytest.mark.parametrize("axes, seeds, message", [
    ([Grid({"model.positionz": ["rope"]})], [0],
     "stage main: axis positionz: model.positionz is not a config field"),
    ([Grid({"train.steps": ["ten"]})], [0], "stage main: axis steps: train.steps='ten' has the "
     "wrong type"),
    ([Grid({"model.dropout_rate": [0.1, 1.5]})], [0],
     "stage main: axis dropout_rate: model.dropout_rate: must lie in [0.0, 1.0), got 1.5"),
    ([Grid({"optim.lr": [-1.0]})], [0], "stage main: axis lr: optim.lr: must be a positive"),
    ([Zip({"optim.lr": [1e-3, 2e-3], "train.steps": [5]})], [0], "fields have different numbers"),
    ([], [-1], "stage main: seed: must be >= 0, got -1"),
])
def test_bad_axes_fail_before_anything_naming_the_axis(tmp_path, axes, seeds, message):
    study = Study("bad", [Stage("main", CHAR, axes=axes, seeds=seeds)])
    with pytest.raises(ConfigError) as e:
        expand(study, str(ROOT), str(tmp_path / "sweep"))
    assert message in str(e.value)
    assert not (tmp_path / "sweep").exists()


def test_missing_base_config_and_bad_stage_links(tmp_path):
    with pytest.raises(ConfigError, match="config: configs/nope.py:x: no such config file"):
        expand(Study("s", [Stage("main", "configs/nope.py:x")]), str(ROOT), str(tmp_path))
    with pytest.raises(ConfigError, match="init_from='pre' is not an earlier stage"):
        expand(Study("s", [Stage("ft", CHAR, init_from="pre")]), str(ROOT), str(tmp_path))


def write_study(tmp_path: Path, body: str) -> Path:
    study_dir = tmp_path / "proj" / "experiments" / "demo"
    study_dir.mkdir(parents=True)
    (study_dir / "study.py").write_text(body)
    (study_dir / "README.md").write_text("# demo\n\n<!-- results:start -->\nold\n"
                                         "<!-- results:end -->\n\nNotes stay.\n")
    return study_dir


def test_cli_bad_study_is_one_line_and_touches_nothing(tmp_path, capsys):
    study_dir = write_study(tmp_path, f"""
from lm.experiment import Grid, Stage, Study
def get_study():
    return Study("demo", [Stage("main", "{ROOT}/{CHAR}",
                                axes=[Grid({{"model.posiiton": ["rope"]}})])])
""")
    sweep = tmp_path / "sweep"
    with pytest.raises(SystemExit) as e:
        cli.main(["launch", str(study_dir), f"--sweep_dir={sweep}"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: stage main: axis posiiton: model.posiiton is not a config field"]
    assert not sweep.exists()
    with pytest.raises(SystemExit) as e:
        cli.main(["status", str(tmp_path / "nowhere")])
    assert e.value.code == 1
    assert "no study file" in capsys.readouterr().err


def fake_run(sweep: Path, run, records, *, finished=True, returncode=None, log=""):
    """A run directory as the trainer leaves it: metrics, a final checkpoint dir, run.json."""
    wd = Path(launch.workdir(str(sweep), run))
    wd.mkdir(parents=True)
    with open(wd / "metrics.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    if finished:
        (wd / "checkpoints" / str(run.final_step)).mkdir(parents=True)
    if log:
        (wd / "run.log").write_text(log)
    if returncode is not None:
        st.write_json(str(wd / "exit.json"), {"returncode": returncode,
                                              "error": st.last_error_line(str(wd))})
    st.write_json(str(wd / "run.json"), {"id": run.id})


def test_report_means_stds_best_and_failed_runs(tmp_path):
    study = Study("demo", [Stage("main", CHAR, axes=[Grid({"model.position": ["learned",
                                                                            "rope"]})],
                                 seeds=[0, 1, 2])],
                  report=Report("eval/loss", mode="last", goal="min"))
    sweep = tmp_path / "sweep"
    runs = expand(study, str(ROOT), str(sweep))
    last = {("learned", 0): 2.0, ("learned", 1): 2.5, ("learned", 2): 3.0,
            ("rope", 0): 1.5, ("rope", 1): 1.75}
    for run in runs:
        key = (dict(run.setting)["position"], run.seed)
        if key in last:
            fake_run(sweep, run, [{"step": 3, "eval/loss": 9.0, "train/loss": 9.5},
                                  {"step": 6, "eval/loss": last[key]}])
        else:  # rope, seed 2: crashed at step 3
            fake_run(sweep, run, [{"step": 3, "eval/loss": 0.1}], finished=False, returncode=1,
                     log="step 3\nerror: data.path: boom\n")
    res = report.collect(study, runs, str(sweep))
    rows = {dict(r.setting)["position"]: r for r in res.rows}
    assert rows["learned"].values == [2.0, 2.5, 3.0]
    assert rows["learned"].mean == 2.5 and rows["learned"].std == 0.5
    assert rows["rope"].n == 2 and rows["rope"].mean == 1.625
    assert math.isclose(rows["rope"].std, math.sqrt(0.03125))
    assert rows["rope"].left_out == ["seed=2 failed"]
    assert rows["rope"].best and not rows["learned"].best
    table = report.results_table(res)
    assert "| rope | **1.6250 ± 0.1768** (best) | 2 | seed=2 failed |" in table
    assert "| learned | 2.5000 ± 0.5000 | 3 |  |" in table
    status = report.status_table(res)
    assert "main/position=rope,seed=2" in status and "error: data.path: boom" in status
    assert "5 finished" in status and "1 failed" in status
    # best-of mode takes the minimum over every eval record of a finished run
    best = Study("demo", study.stages, report=Report("eval/loss", mode="best", goal="min"))
    rows = {dict(r.setting)["position"]: r for r in report.collect(best, runs, str(sweep)).rows}
    assert rows["learned"].values == [2.0, 2.5, 3.0] and rows["rope"].values == [1.5, 1.75]


def test_report_writes_results_plots_and_readme_between_markers(tmp_path, capsys):
    study_dir = write_study(tmp_path, f"""
from lm.experiment import Grid, Report, Stage, Study
def get_study():
    return Study("demo", [Stage("main", "{ROOT}/{CHAR}",
                                axes=[Grid({{"optim.lr": [1e-3, 1e-2]}})], seeds=[0, 1])],
                 report=Report("eval/accuracy", goal="max"))
""")
    sweep = tmp_path / "sweep"
    study, root = cli.load_study(str(study_dir))
    for run in expand(study, root, str(sweep)):
        acc = 0.5 + 0.1 * run.seed + (0.2 if run.resolved["optim"]["lr"] == 1e-2 else 0.0)
        fake_run(sweep, run, [{"step": 2, "eval/accuracy": acc / 2},
                              {"step": 6, "eval/accuracy": acc}])
    assert cli.main(["report", str(study_dir), f"--sweep_dir={sweep}"]) == 0
    readme = (study_dir / "README.md").read_text()
    assert readme.startswith("# demo\n\n<!-- results:start -->\nGenerated by")
    assert readme.endswith("<!-- results:end -->\n\nNotes stay.\n") and "old" not in readme
    assert "| 0.01 | **0.7500 ± 0.0707** (best) | 2 |  |" in readme
    assert "![curves.png](plots/curves.png)" in readme
    for png in ("curves.png", "vs_lr.png"):
        assert (study_dir / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    assert (study_dir / "results.md").read_text().startswith("# demo: results")


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("LM_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"dry run differs from {path} (LM_UPDATE_GOLDEN=1 rewrites)"


@pytest.mark.parametrize("backend, flags", [
    ("slurm", ["--partition=gpu", "--gpus_per_node=1", "--time_min=30", "--max_array_size=3",
               "--array_parallelism=2"]),
    ("tpu_vm", ["--tpu_name=my-v4", "--zone=us-central2-b", "--project=proj",
                "--repo_dir=~/lm"]),
    ("gke", ["--cluster=c1", "--tpu_type=v5litepod-16", "--num_slices=2",
             "--docker_image=gcr.io/p/lm:1", "--zone=us-east5-b"]),
])
def test_dry_runs_equal_golden_files(tmp_path, capsys, backend, flags):
    study_dir = write_study(tmp_path, f"""
from lm.experiment import Grid, Stage, Study
def get_study():
    pre = Stage("pretrain", "{CHAR}", axes=[Grid({{"model.position": ["learned", "rope"]}})],
                seeds=[0, 1])
    ft = Stage("finetune", "{CHAR}", overrides={{"optim.lr": 3e-4}}, init_from="pretrain")
    return Study("demo", [pre, ft])
""")
    # the configs live in the real project: point the study's root at it
    os.symlink(ROOT / "configs", tmp_path / "proj" / "configs")
    assert cli.main(["launch", str(study_dir), f"--backend={backend}", "--dry_run",
                     "--sweep_dir=/sweeps/demo", *flags]) == 0
    out = capsys.readouterr().out
    out = out.replace(str(tmp_path / "proj"), "<root>").replace(cli.sys.executable, "<python>")
    _golden(f"dry_run_{backend}.txt", out)
    assert not Path("/sweeps/demo").exists()


def test_changed_runs_are_refused_then_moved_aside(tmp_path):
    sweep = tmp_path / "sweep"
    study = Study("demo", [Stage("main", CHAR, axes=[Grid({"optim.lr": [1e-3]})])])
    (run,) = expand(study, str(ROOT), str(sweep))
    fake_run(sweep, run, [{"step": 6, "eval/loss": 1.0}])
    assert launch.plan([run], str(sweep)).finished == [run]
    edited = Study("demo", [Stage("main", CHAR, overrides={"train.batch_size": 4},
                                  axes=[Grid({"optim.lr": [1e-3]})])])
    (new,) = expand(edited, str(ROOT), str(sweep))
    assert new.name == run.name and new.id != run.id
    p = launch.plan([new], str(sweep))
    assert p.changed == [new] and not p.todo
    with pytest.raises(ConfigError, match=r"1 run\(s\) changed .*main/lr=0.001,seed=0"):
        launch.resolve_changes(p, str(sweep), "refuse")
    launch.resolve_changes(p, str(sweep), "restart")
    assert p.todo == [new]
    moved = sweep / "main" / f"{run.name}.old-{run.id}"
    assert (moved / "checkpoints" / "6").is_dir()  # nothing lost
    assert not (sweep / "main" / run.name).exists()


def test_an_axis_over_whole_config_files(tmp_path):
    stage = Stage("main", CHAR, overrides={"optim.lr": 2e-3},
                  axes=[Zip({"config": [CHAR, "configs/char_lm.py:baby"],
                             "train.batch_size": [4, 6]}, name="recipe",
                            labels=["test", "baby"])])
    a, b = expand(Study("s", [stage]), str(ROOT), str(tmp_path))
    assert (a.name, a.config, b.name, b.config) == (
        "recipe=test,seed=0", CHAR, "recipe=baby,seed=0", "configs/char_lm.py:baby")
    assert a.resolved["train"]["steps"] == 6 and b.resolved["train"]["steps"] == 2000
    assert a.resolved["optim"]["lr"] == b.resolved["optim"]["lr"] == 2e-3  # stage overrides
    assert b.resolved["train"]["batch_size"] == 6
    assert dict(b.overrides) == {"optim.lr": 2e-3, "train.batch_size": 6, "seed": 0}


STUDIES = sorted((ROOT / "experiments").glob("*/study.py"))


@pytest.mark.parametrize("path", STUDIES, ids=[p.parent.name for p in STUDIES])
def test_every_shipped_study_expands(path, tmp_path):
    study, root = cli.load_study(str(path.parent))
    assert study.name == path.parent.name and Path(root) == ROOT
    runs = expand(study, root, str(tmp_path))
    assert len({r.key for r in runs}) == len(runs) > 0
    assert (path.parent / "README.md").read_text().count(report.START) == 1


def test_change_detection_names_the_field_ignores_added_options_and_follows_parents(tmp_path):
    sweep = tmp_path / "sweep"
    study = two_stage_study()
    runs = expand(study, str(ROOT), str(sweep))
    for run in runs:  # as launched and trained: run.json + the trainer's config.json
        fake_run(sweep, run, [{"step": run.final_step, "eval/loss": 1.0}])
        st.write_json(str(Path(launch.workdir(str(sweep), run)) / "config.json"), run.resolved)
    assert len(launch.plan(runs, str(sweep)).finished) == len(runs)
    # An option added to the codebase later (present only in the new config) is no change.
    older = json.loads(json.dumps(runs[0].resolved))
    del older["model"]["pooler"]
    st.write_json(str(Path(launch.workdir(str(sweep), runs[0])) / "config.json"), older)
    assert launch.plan(runs, str(sweep)).changed == []
    # A changed value is, named with both values; the parent's children follow it.
    pre = Stage("pretrain", CHAR, overrides={"mesh.num_devices": 1, "optim.end_lr": 5e-5},
                axes=[Grid({"model.position": ["learned", "rope"]})], seeds=[0, 1])
    edited = expand(two_stage_study(stages=[pre, study.stages[1]]), str(ROOT), str(sweep))
    p = launch.plan(edited, str(sweep))
    assert len(p.changed) == len(runs)
    assert p.reasons["pretrain/position=learned,seed=0"] == "optim.end_lr: 0.0001 -> 5e-05"
    child = "finetune/position=learned,pretrain_seed=0,recipe=fast,dropout_rate=0,seed=5"
    assert p.reasons[child] == "its parent pretrain/position=learned,seed=0 changed"
    assert any("changed: pretrain/position=rope,seed=1 (optim.end_lr" in line
               for line in launch.describe(p))


def test_restart_moves_changed_runs_aside_even_when_children_never_started(tmp_path):
    sweep = tmp_path / "sweep"
    runs = expand(two_stage_study(), str(ROOT), str(sweep))
    for run in runs[:4]:  # the pretraining stage ran; its children never started
        fake_run(sweep, run, [{"step": run.final_step, "eval/loss": 1.0}])
        st.write_json(str(Path(launch.workdir(str(sweep), run)) / "config.json"), run.resolved)
    pre = Stage("pretrain", CHAR, overrides={"mesh.num_devices": 1, "optim.end_lr": 5e-5},
                axes=[Grid({"model.position": ["learned", "rope"]})], seeds=[0, 1])
    edited = expand(two_stage_study(stages=[pre, two_stage_study().stages[1]]), str(ROOT),
                    str(sweep))
    p = launch.plan(edited, str(sweep))
    launch.resolve_changes(p, str(sweep), "restart")
    assert len(p.todo) == len(edited) and not p.changed
    again = launch.plan(edited, str(sweep))  # the moved-aside directories are not runs
    assert again.removed == [] and len(again.todo) == len(edited)
    assert len(list((sweep / "pretrain").glob("*.old-*"))) == 4

