"""Task mixtures: a one-task mixture is the single-task run, realised task frequencies match
the rates, resume is bit-exact in a new process, per-task eval equals each single-task
objective's, parameters move with init_from both ways, predict --task, and bad inputs."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from lm import config_check, init_from, train
from lm.data import mixture as mix
from lm.errors import ConfigError
from lm.objectives import mixture as mixture_lib
from tests.test_train import assert_same_checkpoints

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["the", "film", "was", "good", "great", "bad", "dull", "fun", "plot", "john", "paris",
         "acme", "visited", "works", "at", "in", "and", "a", "."]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "johan", "##son", "##s"]
TINY_MODEL = dict(num_layers=2, d_model=32, num_heads=2, mlp_dim=64, dropout_rate=0.0,
                  attention_dropout_rate=0.0)


def load_config(arg: str) -> ConfigDict:
    spec = importlib.util.spec_from_file_location("multitask", ROOT / "configs" / "multitask.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """A shared vocabulary, a sentiment TSV and a CoNLL file (train = validation)."""
    tmp = tmp_path_factory.mktemp("data")
    (tmp / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    rng = np.random.default_rng(0)
    lines = ["sentence\tlabel"]
    for _ in range(48):
        good = rng.random() < 0.5
        words = rng.choice(["good", "great", "fun"] if good else ["bad", "dull"], 2)
        lines.append(f"the film was {' '.join(words)}\t{int(good)}")
    (tmp / "train.tsv").write_text("\n".join(lines) + "\n")
    sentences = ["john B-PER\nvisited O\nparis B-LOC\n. O",
                 "acme B-ORG\nworks O\nin O\nparis B-LOC",
                 "john B-PER\njohanson I-PER\nworks O\nat O\nacme B-ORG"]
    (tmp / "train.txt").write_text("-DOCSTART- O\n\n" + "\n\n".join(sentences * 6) + "\n")
    return {"vocab": str(tmp / "vocab.txt"), "tsv": str(tmp / "train.tsv"),
            "conll": str(tmp / "train.txt")}


def overrides(files: dict[str, str], steps: int = 4) -> dict[str, object]:
    """Dotted overrides that shrink configs/multitask.py:random to the tiny data and model."""
    out: dict[str, object] = {f"model.{k}": v for k, v in TINY_MODEL.items()}
    for task in ("sst2", "conll"):
        out[f"tasks.{task}.data.tokenizer_path"] = files["vocab"]
        out[f"tasks.{task}.data.seq_len"] = 16
    out.update({"tasks.sst2.data.path": files["tsv"], "tasks.sst2.data.val_size": 8,
                "tasks.sst2.data.val_split": "random",
                "tasks.conll.data.path": files["conll"],
                "tasks.conll.data.val_path": files["conll"],
                "tasks.conll.data.labels": "O,B-LOC,B-ORG,B-PER,I-PER",
                "mesh.num_devices": 1, "train.steps": steps, "train.batch_size": 4,
                "train.log_every": 1, "train.eval_every": steps,
                "train.checkpoint_every": steps, "train.async_checkpoint": False,
                "optim.warmup_steps": 1, "evals.max_batches": 0})
    return out


def apply(c: ConfigDict, values: dict[str, object]) -> ConfigDict:
    for key, value in values.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def mixture_config(files, arg: str = "random,runlocal", **extra) -> ConfigDict:
    return apply(load_config(arg), {**overrides(files), **extra})


def single_config(c: ConfigDict, task: str) -> ConfigDict:
    return mixture_lib.task_config(c, task)


def read_metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in Path(workdir, "metrics.jsonl").read_text().splitlines()]


def train_losses(workdir, key: str = "train/loss") -> dict[int, float]:
    return {m["step"]: m[key] for m in read_metrics(workdir) if key in m}


# ------------------------------------------------------------- one task == single task
@pytest.mark.parametrize("task", ["sst2", "conll"])
def test_one_task_mixture_is_the_single_task_run(tmp_path, files, task):
    c = mixture_config(files)
    del c.tasks[{"sst2": "conll", "conll": "sst2"}[task]]
    last_mix = train.train_and_evaluate(c, str(tmp_path / "mix"))
    last_one = train.train_and_evaluate(single_config(c, task), str(tmp_path / "one"))
    mixed, single = train_losses(tmp_path / "mix"), train_losses(tmp_path / "one")
    assert sorted(single) == [1, 2, 3, 4]
    # every step's loss, to float32 rounding: the two programs differ (the mixture's
    # per-task heads and metrics), so XLA may fuse the ops after a custom call's product
    # (lm.kernels.gemm on AVX-512 CPUs) differently; with XLA's products alone they agree
    # exactly (LM_GEMM_KERNEL=0)
    assert sorted(mixed) == sorted(single)
    np.testing.assert_allclose([mixed[s] for s in sorted(single)],
                               [single[s] for s in sorted(single)], rtol=1e-6)
    assert train_losses(tmp_path / "mix", f"train/{task}/loss") == mixed
    for key, value in last_one.items():
        if key.startswith("eval/"):
            name = key.removeprefix("eval/")
            np.testing.assert_allclose(last_mix[f"eval/{task}/{name}"], value, rtol=1e-6,
                                       err_msg=key)
    np.testing.assert_allclose(last_mix["eval/loss"], last_one["eval/loss"], rtol=1e-6)


# ------------------------------------------------------------- rates and frequencies
class Counter:
    """A stand-in task iterator: batches {'n': [i]}, state = position."""

    def __init__(self):
        self.i = 0

    def __next__(self):
        self.i += 1
        return {"n": np.array([self.i])}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


EXAMPLES = {"a": 100_000, "b": 20_000, "c": 2_000}


@pytest.mark.parametrize("kind,kwargs,want", [
    ("explicit", dict(rates={"a": 3.0, "b": 1.0, "c": 1.0}), [0.6, 0.2, 0.2]),
    ("examples", dict(examples=EXAMPLES), [100 / 122, 20 / 122, 2 / 122]),
    ("examples", dict(examples=EXAMPLES, cap=20_000), [20 / 42, 20 / 42, 2 / 42]),
    ("temperature", dict(examples=EXAMPLES, temperature=2.0),
     np.sqrt([100, 20, 2]) / np.sqrt([100, 20, 2]).sum()),
])
def test_realised_task_frequencies_match_the_rates(kind, kwargs, want):
    rates = mix.mixing_rates(kind, ["a", "b", "c"], **kwargs)
    np.testing.assert_allclose([rates[n] for n in "abc"], want, rtol=1e-12)
    it = mix.MixtureIterator({n: Counter() for n in "abc"}, rates, seed=3)
    steps = 20_000
    counts = {n: 0 for n in "abc"}
    for _ in range(steps):
        (key,) = next(it)
        counts[key.split("/")[0]] += 1
    for n in "abc":
        assert abs(counts[n] / steps - rates[n]) < 0.02, (kind, n, counts)
    # every task's position is its own count of batches drawn
    assert {n: s["json"]["i"] for n, s in it.get_state()["tasks"].items()} == counts


def test_rows_batching_holds_every_task_in_proportion():
    rates = mix.mixing_rates("explicit", ["a", "b", "c"], rates={"a": 0.5, "b": 0.3, "c": 0.2})
    rows = mix.allocate_rows(rates, 64, multiple=2)
    assert rows == {"a": 32, "b": 20, "c": 12} and sum(rows.values()) == 64
    assert mix.allocate_rows(rates, 10) == {"a": 5, "b": 3, "c": 2}
    for n in "abc":
        assert abs(rows[n] / 64 - rates[n]) < 0.02


def test_task_draw_resumes_from_its_state():
    rates = {"a": 0.5, "b": 0.5}
    first = mix.MixtureIterator({n: Counter() for n in rates}, rates, seed=1)
    seen = [next(first) for _ in range(50)]
    second = mix.MixtureIterator({n: Counter() for n in rates}, rates, seed=1)
    for _ in range(20):
        next(second)
    third = mix.MixtureIterator({n: Counter() for n in rates}, rates, seed=1)
    third.set_state(json.loads(json.dumps(second.get_state())))
    assert [next(third) for _ in range(30)] == seen[20:]
    other = mix.MixtureIterator({n: Counter() for n in rates}, rates, seed=2)
    assert [list(next(other)) for _ in range(50)] != [list(b) for b in seen]


@pytest.mark.parametrize("mixing", ["examples", "temperature"])
def test_rows_batches_follow_the_counted_examples(tmp_path, files, mixing):
    c = mixture_config(files, **{"data.mixing": mixing, "data.batching": "rows",
                                 "data.rate_cap": 0, "train.batch_size": 12})
    setup = train.build(c, str(tmp_path / "run"))
    # 48 labelled sentences less 8 for validation; 18 CoNLL sentences (train = validation)
    counts = {"conll": 18, "sst2": 40}
    want = mix.mixing_rates(mixing, ["conll", "sst2"], examples=counts, temperature=2.0)
    assert setup.objective.rates == want
    rows = mix.allocate_rows(want, 12)
    batch = next(setup.data.train_iter)
    for task in ("conll", "sst2"):
        assert batch[f"{task}/inputs"].shape == (rows[task], 16)
    assert sum(rows.values()) == 12 and rows["sst2"] > rows["conll"] > 0


# ------------------------------------------------------------- resume in a new process
def run_main(workdir, files, steps: int, *extra: str) -> None:
    values = {**overrides(files, steps), "train.checkpoint_every": 3, "optim.decay_steps": 6,
              "train.eval_every": 6}
    cmd = [sys.executable, "-m", "lm.main", "--config=configs/multitask.py:random,runlocal",
           f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in values.items()), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory, files):
    tmp = tmp_path_factory.mktemp("resume")
    straight, split = tmp / "straight", tmp / "split"
    run_main(straight, files, 6)
    run_main(split, files, 3)
    run_main(split, files, 6)
    return straight, split


def test_resume_in_a_new_process_is_bit_exact(tmp_path, files, resumed_runs):
    straight, split = resumed_runs
    c = apply(mixture_config(files), {"train.checkpoint_every": 3, "optim.decay_steps": 6})
    data_a, data_b = assert_same_checkpoints(c, tmp_path, straight, split)  # params + Adam
    assert data_a == data_b and data_a["step"] == 6
    assert sorted(data_a["tasks"]) == ["conll", "sst2"]  # every task's own position
    assert train_losses(straight) == train_losses(split)
    tasks = {k.split("/")[1] for m in read_metrics(straight) for k in m
             if k.startswith("train/") and k.count("/") == 2}
    assert tasks == {"sst2", "conll"}  # both tasks were drawn in 6 steps of this seed


def test_predict_takes_the_task(resumed_runs):
    straight, _ = resumed_runs

    def predict(*args):
        return subprocess.run([sys.executable, "-m", "lm.predict", f"--workdir={straight}",
                               *args], cwd=ROOT, capture_output=True, text=True, timeout=300)

    proc = predict("--task", "sst2", "--text", "the film was great")
    assert proc.returncode == 0, proc.stderr[-2000:]
    label, score, text = proc.stdout.strip().split("\t")
    assert label in ("negative", "positive") and 0.5 <= float(score) <= 1.0
    proc = predict("--task", "conll", "--text", "john visited paris")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [p.rsplit("/", 1)[0] for p in proc.stdout.split()] == ["john", "visited", "paris"]
    for args, message in ((["--text", "x"], "--task: required for a mixture run; tasks: "
                                            "conll, sst2"),
                          (["--task", "nope", "--text", "x"], "--task: unknown task 'nope'")):
        proc = predict(*args)
        assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(
            f"error: {message}"), proc.stderr[-1000:]


def test_init_from_moves_the_backbone_both_ways(tmp_path, files, resumed_runs):
    straight, _ = resumed_runs
    mixed = init_from.load_source(str(straight))
    assert any(k.startswith("heads/sst2/classifier/") for k in mixed)
    c = mixture_config(files)
    one = train.build(single_config(c, "sst2"), str(tmp_path / "one"))
    fresh = one.init_state().params
    loaded = init_from.load_params(str(straight), fresh)  # mixture -> single task
    flat = init_from.files.flatten(jax.device_get(loaded))
    encoder = [k for k in flat if k.startswith("encoder/")]
    assert encoder and all(np.array_equal(flat[k], mixed[k]) for k in encoder)
    # single task -> mixture: the backbone, and the head of the task with the same shapes
    single = {k: v + 1.0 for k, v in mixed.items() if not k.startswith("heads/")}
    single.update({k.removeprefix("heads/sst2/"): v - 1.0 for k, v in mixed.items()
                   if k.startswith("heads/sst2/")})
    mix_setup = train.build(c, str(tmp_path / "mix"))
    target = jax.device_get(mix_setup.init_state().params)
    merged, report = init_from.merge(single, target)
    out = init_from.files.flatten(merged)
    for k in encoder:
        np.testing.assert_array_equal(out[k], single[k])
    np.testing.assert_array_equal(out["heads/sst2/classifier/dense/kernel"],
                                  single["classifier/dense/kernel"])
    assert "heads/conll/classifier/dense/kernel" in report.new  # 5 tags vs 2 labels: fresh


# ------------------------------------------------------------- per-task evaluation
def test_per_task_eval_equals_each_single_task_objective(tmp_path, files):
    c = mixture_config(files)
    workdir = tmp_path / "mix"
    setup = train.build(c, str(workdir))
    params = setup.init_state().params
    got = train.make_evaluate(setup, 0)(params)
    weighted = 0.0
    for task in ("sst2", "conll"):
        one = train.build(single_config(c, task), str(workdir / "tasks" / task))
        want = train.make_evaluate(one, 0)(setup.objective.task_params(params, task))
        assert want, task
        for key, value in want.items():
            assert got[f"eval/{task}/{key.removeprefix('eval/')}"] == value, (task, key)
        weighted += want["eval/loss"]
    assert "eval/conll/f1" in got and "eval/sst2/accuracy" in got
    assert got["eval/loss"] == pytest.approx(weighted, rel=1e-12)


# ------------------------------------------------------------- one decoder, two tasks
def test_causal_lm_and_classification_share_one_decoder(tmp_path, files):
    from lm.objectives import get

    c = load_config("decoder,runlocal")
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(open(files["tsv"]).read().splitlines()[1:]).replace("\t", " "))
    apply(c, {**{f"model.{k}": v for k, v in TINY_MODEL.items()}, "model.max_len": 16,
              **{k: v for k, v in overrides(files).items() if k.startswith(
                  ("tasks.sst2", "mesh", "train", "optim", "evals"))},
              "tasks.lm.data.path": str(text), "tasks.lm.data.val_path": str(text),
              "tasks.lm.data.tokenizer_path": files["vocab"], "tasks.lm.data.seq_len": 16})
    last = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert last["eval/lm/ppl"] == pytest.approx(np.exp(last["eval/lm/loss"]), rel=1e-6)
    assert 0.0 <= last["eval/sst2/accuracy"] <= 1.0
    assert last["eval/loss"] == pytest.approx(last["eval/lm/loss"] + last["eval/sst2/loss"])
    # the shared decoder has a causal LM's own parameter paths; the classifier is a head
    mixed = init_from.files.flatten(jax.eval_shape(lambda: train.build(
        c, str(tmp_path / "run")).init_state()).params)
    lm_only = get(single_config(c, "lm"))
    cfg = train.to_model_config(c.model, vocab_size=len(VOCAB))
    shapes = jax.eval_shape(lambda: lm_only.init(lm_only.build_model(cfg), jax.random.key(0),
                                                 lm_only.dummy_batch(1)))["params"]
    single = init_from.files.flatten(jax.tree.map(lambda x: x, shapes))
    assert sorted(k for k in mixed if not k.startswith("heads/")) == sorted(single)
    assert sorted(k for k in mixed if k.startswith("heads/")) == [
        "heads/sst2/classifier/dense/bias", "heads/sst2/classifier/dense/kernel"]


# ------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("edit,message", [
    ({"tasks.conll.data.val_path": "", "tasks.conll.data.val_size": 0,
      "tasks.conll.data.val_fraction": 0.0},
     "tasks.conll.data: task 'conll' has no validation data"),
    ({"tasks.sst2.objective": "regression"},
     "tasks.sst2.objective: unknown task objective 'regression'"),
    ({"tasks.sst2.rate": 0.0, "tasks.conll.rate": 0.0},
     "tasks: every task's rate is 0 (conll, sst2)"),
])
def test_bad_tasks_fail_before_any_compute_naming_the_task(tmp_path, files, edit, message):
    c = apply(mixture_config(files), edit)
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        config_check.validate(c)
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        train.build(c, str(tmp_path / "run"))  # also without lm.main's check
    assert not (tmp_path / "run" / "tasks").exists()  # nothing was read or written


def test_bad_task_is_one_line_on_the_command_line(tmp_path, files):
    values = {**overrides(files), "tasks.sst2.objective": "regression"}
    cmd = [sys.executable, "-m", "lm.main", "--config=configs/multitask.py:random,runlocal",
           f"--workdir={tmp_path / 'run'}", *(f"--config.{k}={v}" for k, v in values.items())]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: tasks.sst2.objective: unknown task objective 'regression'; known: bert, "
        "causal_lm, classification, prefix_lm, seq2seq, span_corruption, tagging"]
