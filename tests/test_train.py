"""Training system: golden loss, exact resume across processes, 1 vs 8 devices, SIGTERM,
bad input, and every shipped config building its model."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lm import checkpoint, config_check, train
from lm.config_base import to_model_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(glob.glob(str(ROOT / "configs" / "*.py")))


def corpus(tmp_path: Path, n_chars: int = 20_000) -> str:
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "speaks", "to", "all", "men", "of", "rome", "and", "we",
             "shall", "not", "fear", "thee", "my", "lord", "good", "night"]
    text = []
    while sum(map(len, text)) < n_chars:
        text.append(" ".join(rng.choice(words, size=rng.integers(4, 12))) + ".\n")
    path = tmp_path / "corpus.txt"
    path.write_text("".join(text))
    return str(path)


def load_config(name: str, arg: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def make_config(tmp_path, **overrides):
    c = load_config("char_lm", "test")
    c.data.path = corpus(tmp_path)
    c.mesh.num_devices = 1
    c.train.async_checkpoint = False
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def read_metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(workdir) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m}


def run_main(workdir, *overrides, env=None, check=True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lm.main", "--config=configs/char_lm.py:test",
           f"--workdir={workdir}", "--config.mesh.num_devices=1", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# ------------------------------------------------------------------ golden numbers
def test_golden_loss_after_one_step(tmp_path):
    c = make_config(tmp_path, **{"train.steps": 2, "train.log_every": 1, "train.eval_every": 2})
    train.train_and_evaluate(c, str(tmp_path / "run"))
    got = losses(tmp_path / "run")
    # Step 1 is the loss at initialisation; step 2 the loss after one AdamW update.
    np.testing.assert_allclose([got[1], got[2]], GOLDEN_LOSSES, rtol=1e-4)


GOLDEN_LOSSES = [3.404240, 3.393329]


# ---------------------------------------------------------------------- resume
def test_resume_in_new_process_is_bit_exact(tmp_path):
    path = corpus(tmp_path)
    straight, split = tmp_path / "straight", tmp_path / "split"
    # The schedule is fixed to 6 steps, as for a 6-step run interrupted at step 3.
    common = [f"--config.data.path={path}", "--config.train.checkpoint_every=3",
              "--config.train.log_every=1", "--config.optim.decay_steps=6"]
    run_main(straight, *common, "--config.train.steps=6")
    run_main(split, *common, "--config.train.steps=3")
    run_main(split, *common, "--config.train.steps=6")

    data_a, data_b = assert_same_checkpoints(make_config(tmp_path), tmp_path, straight, split)
    assert data_a == data_b  # the iterator is at the same position: the same batches seen
    assert losses(straight) == losses(split)  # and every step's loss agrees exactly


def assert_same_checkpoints(config, tmp_path, *workdirs, step: int = 6):
    """Restores each run's checkpoint at `step` (the last one) and requires bit-identical
    states (params and optimizer); returns each run's data-iterator state."""
    setup = train.build(config, str(tmp_path / "scratch"))
    target = checkpoint.abstract_like(setup.init_state())
    states = []
    for workdir in workdirs:
        ckpt = checkpoint.Checkpointer(workdir, max_to_keep=3, save_every=3)
        assert ckpt.latest_step() == step
        states.append(ckpt.restore(step, target))
        ckpt.close()
    first = jax.tree.leaves(states[0][0])
    for state, _ in states[1:]:
        for x, y in zip(first, jax.tree.leaves(state), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    return [data for _, data in states]


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    base = {"train.steps": 3, "train.log_every": 1, "train.eval_every": 3}
    train.train_and_evaluate(make_config(tmp_path, **base), str(tmp_path / "full"))
    last = train.train_and_evaluate(
        make_config(tmp_path, **base, **{"optim.grad_accum_steps": 4}), str(tmp_path / "acc"))
    full, acc = losses(tmp_path / "full"), losses(tmp_path / "acc")
    assert sorted(acc) == [1, 2, 3]  # the logged step is the optimizer step
    for step in full:
        assert abs(full[step] - acc[step]) < 1e-5, (step, full[step], acc[step])
    assert last["eval/ppl"] == pytest.approx(np.exp(last["eval/loss"]), rel=1e-6)


# ----------------------------------------------------------------- 1 vs 8 devices
@pytest.mark.parametrize("mesh", [dict(data=8, fsdp=1, rules="dp"),
                                  dict(data=1, fsdp=8, rules="fsdp"),
                                  dict(data=2, fsdp=4, rules="fsdp")])
def test_eight_devices_match_one(tmp_path, mesh):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices: conftest sets XLA_FLAGS")
    base = {"train.steps": 4, "train.log_every": 1, "train.eval_every": 4}
    c1 = make_config(tmp_path, **base)
    train.train_and_evaluate(c1, str(tmp_path / "one"))
    c8 = make_config(tmp_path, **base, **{"mesh.num_devices": 8},
                     **{f"mesh.{k}": v for k, v in mesh.items()})
    last = train.train_and_evaluate(c8, str(tmp_path / "eight"))
    one, eight = losses(tmp_path / "one"), losses(tmp_path / "eight")
    assert sorted(one) == [1, 2, 3, 4]
    for step in one:
        assert abs(one[step] - eight[step]) < 1e-5, (step, one[step], eight[step])
    assert "eval/loss" in last


# ---------------------------------------------------------------------- SIGTERM
def test_sigterm_saves_a_restorable_checkpoint_and_exits_zero(tmp_path):
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "lm.main", "--config=configs/char_lm.py:test",
           f"--workdir={workdir}", "--config.mesh.num_devices=1",
           f"--config.data.path={corpus(tmp_path)}", "--config.train.steps=100000",
           "--config.train.log_every=1", "--config.train.eval_every=100000",
           "--config.train.checkpoint_every=100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(read_metrics(workdir)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=3, save_every=1)
    step = ckpt.latest_step()
    assert step is not None and step >= max(losses(workdir))
    c = make_config(tmp_path)
    setup = train.build(c, str(tmp_path / "scratch"))
    state, data_state = ckpt.restore(step, checkpoint.abstract_like(setup.init_state()))
    assert int(state.step) == step and data_state is not None
    ckpt.close()


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("overrides,needle", [
    (["--config.train.stepz=3"], "stepz"),
    (["--config.train.steps=many"], "config.train.steps"),
    (["--config.data.path=/no/such/file.txt"], "data.path"),
    (["--config.data.tokenizer=morse"], "data.tokenizer"),
])
def test_bad_input_is_one_line_and_nonzero(tmp_path, overrides, needle):
    proc = run_main(tmp_path / "run", f"--config.data.path={corpus(tmp_path)}", *overrides,
                    check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and needle in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_empty_file_and_indivisible_batch(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = run_main(tmp_path / "a", f"--config.data.path={empty}", check=False)
    assert proc.returncode != 0 and "empty" in proc.stderr.strip().splitlines()[-1]
    proc = run_main(tmp_path / "b", f"--config.data.path={corpus(tmp_path)}",
                    "--config.mesh.num_devices=0", "--config.train.batch_size=6", check=False,
                    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "train.batch_size" in last, proc.stderr[-2000:]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    c = make_config(tmp_path, **{"train.steps": 4, "train.checkpoint_every": 2})
    train.train_and_evaluate(c, str(tmp_path / "run"))
    c = make_config(tmp_path, **{"train.steps": 8, "train.checkpoint_every": 2,
                                 "optim.lr": float("inf")})
    with pytest.raises(train.NonFiniteLoss, match="at step 6"):
        train.train_and_evaluate(c, str(tmp_path / "run"))
    ckpt = checkpoint.Checkpointer(tmp_path / "run", max_to_keep=3, save_every=2)
    assert ckpt.latest_step() == 4


# --------------------------------------------------------------------- configs
@pytest.mark.parametrize("path", CONFIGS)
def test_every_config_builds_its_model(path):
    from lm import objectives

    module_name = Path(path).stem
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    variants = getattr(module, "VARIANTS", {None: None})
    for variant in variants:
        c = module.get_config(variant)
        config_check.validate(c)  # every shipped variant passes the one-place field checks
        objective = objectives.get(c)
        cfg = to_model_config(c.model, vocab_size=c.model.vocab_size or 512)
        model = objective.build_model(cfg)
        batch = objective.dummy_batch(2)
        shapes = jax.eval_shape(lambda o=objective, m=model, b=batch: o.init(
            m, jax.random.key(0), b))
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
        assert n > 0, (path, variant)


def _digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("damage", ["truncate", "delete", "garbage_data"])
def test_damaged_latest_checkpoint_falls_back_and_is_kept(tmp_path, damage, caplog):
    """The final checkpoint damaged; the same command again falls back to step 4, keeps the
    damaged directory untouched, and re-creates step 6 bit for bit."""
    from lm.init_from import read_run_params
    from lm.rundir import run_steps

    base = {"train.steps": 6, "train.checkpoint_every": 2, "train.log_every": 1,
            "train.eval_every": 6}
    run = tmp_path / "run"
    train.train_and_evaluate(make_config(tmp_path, **base), str(run))
    original, _ = read_run_params(str(run), 6)
    step6 = run / "checkpoints" / "6"
    if damage == "truncate":  # the largest array file cut to half its length
        victim = max((p for p in (step6 / "state").rglob("*") if p.is_file()),
                     key=lambda p: p.stat().st_size)
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    elif damage == "delete":
        (step6 / "state" / "manifest.ocdbt").unlink()
    else:
        (step6 / "data" / "process_0-of-1.json").write_text("{not json")
    damaged = _digest(step6)
    with caplog.at_level("WARNING"):
        train.train_and_evaluate(make_config(tmp_path, **base), str(run))
    assert "checkpoint step 6 in" in caplog.text and "is unreadable" in caplog.text
    kept = run / "checkpoints" / "6.unreadable"
    assert _digest(kept) == damaged  # never deleted, never modified
    assert run_steps(str(run)) == [2, 4, 6]
    again, _ = read_run_params(str(run), 6)
    for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(original), strict=True):
        np.testing.assert_array_equal(x, y)  # resumed from step 4 exactly


def test_restore_onto_a_different_mesh_is_bit_identical_and_continues(tmp_path):
    """Checkpointed on 8 devices under fsdp; resumed on 4 and on 1 device."""
    import shutil

    from lm.init_from import read_run_params
    from lm.rundir import run_steps

    mesh8 = {"mesh.num_devices": 8, "mesh.data": 1, "mesh.fsdp": 8, "mesh.rules": "fsdp",
             "train.steps": 4, "train.checkpoint_every": 2, "train.eval_every": 4}
    run8 = tmp_path / "run8"
    train.train_and_evaluate(make_config(tmp_path, **mesh8), str(run8))
    saved, _ = read_run_params(str(run8), 4)
    for n in (4, 1):
        run = tmp_path / f"run{n}"
        shutil.copytree(run8, run)
        c = make_config(tmp_path, **{**mesh8, "mesh.num_devices": n, "mesh.fsdp": n,
                                     "train.steps": 6})
        setup = train.build(c, str(run))
        state = setup.init_state()
        with checkpoint.Checkpointer(run, max_to_keep=3, save_every=2) as ck:
            restored, _ = ck.restore(4, checkpoint.abstract_like(state))
        for leaf in jax.tree.leaves(restored.params):
            assert len(leaf.sharding.device_set) == n
        for x, y in zip(jax.tree.leaves(restored.params), jax.tree.leaves(saved), strict=True):
            np.testing.assert_array_equal(np.asarray(x), y)
        train.train_and_evaluate(c, str(run))
        assert run_steps(str(run))[-1] == 6
        assert max(losses(run)) == 6 and np.isfinite(losses(run)[6])


def test_profile_steps_write_a_trace(tmp_path):
    c = make_config(tmp_path, **{"train.steps": 4, "train.profile_start": 2,
                                 "train.profile_steps": 2})
    train.train_and_evaluate(c, str(tmp_path / "run"))
    traces = list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    train.train_and_evaluate(make_config(tmp_path, **{"train.steps": 2}), str(tmp_path / "off"))
    assert not (tmp_path / "off" / "profile").exists()
