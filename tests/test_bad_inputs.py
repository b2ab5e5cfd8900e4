"""A catalogue of bad inputs over every command line: each ends with exit code 1, one
`error:` line naming the field or file, no traceback, and the run's checkpoints untouched."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lm.rundir import run_steps

ROOT = Path(__file__).resolve().parents[1]
CHAR = "--config=configs/char_lm.py:test"


def sh(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad_inputs")
    corpus = d / "corpus.txt"
    corpus.write_text("the king speaks to all men of rome and we shall not fear.\n" * 300)
    (d / "empty.txt").write_text("")
    (d / "binary.bin").write_bytes(bytes(range(256)) * 64)
    (d / "a_file").write_text("not a directory")
    (d / "broken.py").write_text("def get_config(:\n")
    (d / "noget.py").write_text("X = 1\n")
    hf = d / "hf_corrupt"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "model_type": "bert", "architectures": ["BertModel"], "vocab_size": 100,
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64, "type_vocab_size": 2}))
    (hf / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": trunc")
    (d / "no_config_dir").mkdir()
    run = d / "run"
    proc = sh("-m", "lm.main", CHAR, f"--workdir={run}", f"--config.data.path={corpus}",
              "--config.train.async_checkpoint=False")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (d / "study_missing").mkdir()
    study = d / "proj" / "experiments" / "bad"
    study.mkdir(parents=True)
    (study / "study.py").write_text(
        "from lm.experiment import Grid, Stage, Study\n"
        "def get_study():\n"
        f"    return Study('bad', [Stage('main', '{ROOT}/configs/char_lm.py:test',\n"
        "                  axes=[Grid({'optim.lrr': [1e-3]})])])\n")
    broken_study = d / "proj" / "experiments" / "broken"
    broken_study.mkdir()
    (broken_study / "study.py").write_text("def get_study(:\n")
    return {"dir": d, "corpus": corpus, "run": run, "hf": hf, "study": study,
            "broken_study": broken_study}


def main_args(f, *extra):
    return ["-m", "lm.main", CHAR, f"--workdir={f['dir'] / 'new_run'}",
            f"--config.data.path={f['corpus']}", *extra]


# (id, argv from the fixture's files, what the one error line must contain)
CASES = [
    # ------------------------------------------------------------ lm.main: config files
    ("config_missing", lambda f: ["-m", "lm.main", "--config=configs/nope.py",
                                  f"--workdir={f['dir'] / 'w'}"], "configs/nope.py"),
    ("config_syntax", lambda f: ["-m", "lm.main", f"--config={f['dir'] / 'broken.py'}",
                                 f"--workdir={f['dir'] / 'w'}"], "broken.py:1"),
    ("config_no_get_config", lambda f: ["-m", "lm.main", f"--config={f['dir'] / 'noget.py'}",
                                        f"--workdir={f['dir'] / 'w'}"], "get_config"),
    ("no_workdir", lambda f: ["-m", "lm.main", CHAR], "--workdir"),
    ("workdir_is_file", lambda f: ["-m", "lm.main", CHAR, f"--workdir={f['dir'] / 'a_file'}"],
     "--workdir"),
    ("stray_argument", lambda f: main_args(f, "extra"), "unexpected arguments"),
    # ------------------------------------------------------------ lm.main: overrides
    ("unknown_field", lambda f: main_args(f, "--config.train.stepz=3"), "stepz"),
    ("ill_typed", lambda f: main_args(f, "--config.train.steps=abc"), "train.steps"),
    ("steps_zero", lambda f: main_args(f, "--config.train.steps=0"), "train.steps"),
    ("lr_negative", lambda f: main_args(f, "--config.optim.lr=-1"), "optim.lr"),
    ("lr_nan", lambda f: main_args(f, "--config.optim.lr=nan"), "optim.lr"),
    ("dropout_above_1", lambda f: main_args(f, "--config.model.dropout_rate=1.5"),
     "model.dropout_rate"),
    ("attention_dropout_negative",
     lambda f: main_args(f, "--config.model.attention_dropout_rate=-0.1"),
     "model.attention_dropout_rate"),
    ("b2_one", lambda f: main_args(f, "--config.optim.b2=1.0"), "optim.b2"),
    ("batch_zero", lambda f: main_args(f, "--config.train.batch_size=0"), "train.batch_size"),
    ("position_choice", lambda f: main_args(f, "--config.model.position=absolute"),
     "model.position"),
    ("cudnn_on_cpu", lambda f: main_args(f, "--config.model.attention_impl=cudnn"),
     "model.attention_impl"),
    ("dtype_unknown", lambda f: main_args(f, "--config.model.dtype=float33"), "model.dtype"),
    ("mesh_rules", lambda f: main_args(f, "--config.mesh.rules=zz"), "mesh.rules"),
    ("mesh_axis_zero", lambda f: main_args(f, "--config.mesh.data=0"), "mesh.data"),
    ("objective_unknown", lambda f: main_args(f, "--config.objective=foo"), "objective"),
    ("schedule_unknown", lambda f: main_args(f, "--config.optim.schedule=wavy"),
     "optim.schedule"),
    ("val_fraction", lambda f: main_args(f, "--config.data.val_fraction=1.5"),
     "data.val_fraction"),
    ("tokenizer_unknown", lambda f: main_args(f, "--config.data.tokenizer=bpe9"),
     "data.tokenizer"),
    ("log_every_zero", lambda f: main_args(f, "--config.train.log_every=0"), "train.log_every"),
    ("grad_accum_indivisible", lambda f: main_args(f, "--config.optim.grad_accum_steps=3"),
     "optim.grad_accum_steps"),
    ("heads_indivisible", lambda f: main_args(f, "--config.model.num_heads=3"),
     "model.num_heads"),
    # ------------------------------------------------------------ lm.main: data files
    ("data_missing", lambda f: main_args(f, f"--config.data.path={f['dir'] / 'nope.txt'}"),
     "nope.txt"),
    ("data_empty", lambda f: main_args(f, f"--config.data.path={f['dir'] / 'empty.txt'}"),
     "empty.txt"),
    ("data_binary", lambda f: main_args(f, f"--config.data.path={f['dir'] / 'binary.bin'}"),
     "binary.bin"),
    ("init_from_missing", lambda f: main_args(f, f"--config.init_from={f['dir'] / 'gone'}"),
     "gone"),
    # ------------------------------------------------------------ lm.main: resumed run
    ("resume_changed_model", lambda f: ["-m", "lm.main", CHAR, f"--workdir={f['run']}",
                                        f"--config.data.path={f['corpus']}",
                                        "--config.model.num_layers=3",
                                        "--config.train.steps=12"], "params/layer_2"),
    # ------------------------------------------------------------ lm.sample
    ("sample_temperature", lambda f: ["-m", "lm.sample", f"--workdir={f['run']}",
                                      "--temperature=-1"], "--temperature"),
    ("sample_top_p", lambda f: ["-m", "lm.sample", f"--workdir={f['run']}", "--top_p=1.5"],
     "--top_p"),
    ("sample_top_k", lambda f: ["-m", "lm.sample", f"--workdir={f['run']}", "--top_k=-3"],
     "--top_k"),
    ("sample_max_new", lambda f: ["-m", "lm.sample", f"--workdir={f['run']}",
                                  "--max_new_tokens=0"], "--max_new_tokens"),
    ("sample_no_run", lambda f: ["-m", "lm.sample", f"--workdir={f['dir'] / 'nowhere'}"],
     "nowhere"),
    ("sample_bad_step", lambda f: ["-m", "lm.sample", f"--workdir={f['run']}", "--step=999"],
     "999"),
    ("sample_not_a_run", lambda f: ["-m", "lm.sample", f"--workdir={f['dir'] / 'no_config_dir'}"],
     "config.json"),
    # ------------------------------------------------------------ lm.predict
    ("predict_no_run", lambda f: ["-m", "lm.predict", f"--workdir={f['dir'] / 'nowhere'}",
                                  "--text=hi"], "nowhere"),
    ("predict_missing_file", lambda f: ["-m", "lm.predict", f"--workdir={f['run']}",
                                        f"--file={f['dir'] / 'texts.txt'}"], "texts.txt"),
    ("predict_causal_run", lambda f: ["-m", "lm.predict", f"--workdir={f['run']}",
                                      "--text=hi"], "objective"),
    ("predict_nothing", lambda f: ["-m", "lm.predict", f"--workdir={f['run']}"], "--text"),
    # ------------------------------------------------------------ lm.convert
    ("convert_missing_src", lambda f: ["-m", "lm.convert", "from-hf", str(f["dir"] / "nohf"),
                                       str(f["dir"] / "out1")], "nohf"),
    ("convert_corrupt_safetensors", lambda f: ["-m", "lm.convert", "from-hf", str(f["hf"]),
                                               str(f["dir"] / "out2")], "model.safetensors"),
    ("convert_not_a_run", lambda f: ["-m", "lm.convert", "to-hf",
                                     f"--workdir={f['dir'] / 'no_config_dir'}",
                                     f"--out={f['dir'] / 'out3'}"], "no_config_dir"),
    ("convert_bad_step", lambda f: ["-m", "lm.convert", "to-hf", f"--workdir={f['run']}",
                                    f"--out={f['dir'] / 'out4'}", "--step=999"], "999"),
    # ------------------------------------------------------------ lm.experiment
    ("study_missing", lambda f: ["-m", "lm.experiment", "status",
                                 str(f["dir"] / "study_missing")], "study.py"),
    ("study_unknown_axis", lambda f: ["-m", "lm.experiment", "launch", str(f["study"]),
                                      f"--sweep_dir={f['dir'] / 'sweep'}"], "axis lrr"),
    ("study_syntax", lambda f: ["-m", "lm.experiment", "launch", str(f["broken_study"]),
                                "--dry_run"], "study.py:1"),
]


def test_catalogue_has_at_least_40_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, argv, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(files, name, argv, needle):
    ckpt = files["run"] / "checkpoints"
    before = tree_digest(ckpt)
    proc = sh(*argv(files))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert needle in errors[0], errors[0]
    assert tree_digest(ckpt) == before, "a bad input changed the run's checkpoints"
    assert run_steps(str(files["dir"] / "new_run")) == []  # no checkpoint was committed


def _mount_tmpfs(path: Path, size: int) -> str | None:
    """None when a tmpfs of `size` bytes is mounted at `path`, else why not."""
    path.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(path)], capture_output=True, text=True, timeout=20)
    except OSError as e:
        return f"mount: {e}"
    return None if proc.returncode == 0 else f"cannot mount a tmpfs: {proc.stderr.strip()}"


def test_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, files):
    from lm.init_from import read_run_params

    # Size the disk from a real run: the data, then room for one checkpoint but not two.
    ref = files["run"]
    ckpt = next(p for p in sorted((ref / "checkpoints").iterdir()) if p.name.isdigit())
    one = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    data = sum(p.stat().st_size for p in (ref / "data").rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    why = _mount_tmpfs(disk, data + 2 * one + (3 << 20) // 2)
    if why:
        pytest.skip(why)
    try:
        workdir = disk / "run"
        proc = sh("-m", "lm.main", CHAR, f"--workdir={workdir}",
                  f"--config.data.path={files['corpus']}", "--config.train.steps=40",
                  "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=5",
                  "--config.train.async_checkpoint=False")
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert len(errors) == 1 and f"--workdir: {workdir}: no space for the checkpoint" in (
            errors[0]) and "MiB free" in errors[0], errors
        kept = run_steps(str(workdir))
        assert kept and f"the last checkpoint, step {kept[-1]}, is intact" in errors[0]
        params, step = read_run_params(str(workdir))  # readable
        assert step == kept[-1] and params
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True, timeout=20)
