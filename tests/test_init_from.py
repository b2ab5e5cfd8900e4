"""init_from: run directories (latest / @STEP), converted and Hugging Face directories,
encoder -> classifier mapping, scan layouts, shape mismatches and the training loop's use."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from lm import checkpoint, convert, init_from, train
from lm.convert import __main__ as convert_cli
from lm.models import BertPretrainer, Encoder, SequenceClassifier, TokenClassifier, preset

ROOT = Path(__file__).resolve().parents[1]
V = 99


def tiny_bert(**kw):
    return preset("bert_tiny", **{**dict(vocab_size=V, d_model=64, num_heads=4, mlp_dim=128,
                                         max_len=40), **kw})


def init(module, seed: int):
    """Random params of `module` on one device (unboxed, as `train` hands them to
    `load_params`); shapes from `eval_shape`, so nothing is compiled."""
    ids = np.zeros((1, 8), np.int32)
    args = (ids, np.zeros((1, 2), np.int32)) if isinstance(module, BertPretrainer) else (ids,)
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *args)["params"])
    rng = np.random.default_rng(seed)
    return jax.device_put(jax.tree.map(
        lambda x: rng.normal(size=x.shape).astype(np.float32), shapes), jax.devices()[0])


def save_run(run: Path, params_by_step: dict) -> None:
    """A run directory of ours: train states (with optimizer state) saved by Checkpointer."""
    with checkpoint.Checkpointer(run, max_to_keep=5, save_every=1, async_save=False) as ckpt:
        for step, params in params_by_step.items():
            state = train.TrainState(step=np.int32(step), params=params,
                                     opt_state=optax.adamw(1e-3).init(params),
                                     rng=jax.random.key_data(jax.random.key(0)))
            ckpt.save(step, state, None, force=True)


def flat(tree) -> dict[str, np.ndarray]:
    return convert.flatten(tree)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A BertPretrainer run with two checkpoints (steps 1 and 2, different params)."""
    run = tmp_path_factory.mktemp("pretrain")
    module = BertPretrainer(tiny_bert())
    steps = {1: init(module, 1), 2: init(module, 2)}
    save_run(run, steps)
    return run, steps


def test_run_dir_into_sequence_classifier(pretrained):
    run, steps = pretrained
    target = init(SequenceClassifier(tiny_bert(), 3), 7)
    params, report = init_from.merge(init_from.load_source(str(run)), target, str(run))
    src, got, fresh = flat(steps[2]), flat(params), flat(target)
    assert report.new == ["classifier/dense/bias", "classifier/dense/kernel"]
    assert sorted(report.unused) == sorted(k for k in src if k.startswith(("mlm/", "nsp_head/")))
    assert len(report.loaded) == len(fresh) - 2
    for name in report.loaded:  # encoder/* and pooler/* come from the checkpoint
        np.testing.assert_array_equal(got[name], src[name], err_msg=name)
    for name in report.new:
        np.testing.assert_array_equal(got[name], fresh[name])
    leaf = params["encoder"]["embedder"]["token"]["embedding"]
    assert isinstance(leaf, jax.Array) and leaf.sharding == target["encoder"]["embedder"][
        "token"]["embedding"].sharding
    assert "2 newly initialised" in report.table(str(run))

    older = init_from.load_params(f"{run}@1", target)  # an explicit step
    np.testing.assert_array_equal(flat(older)["encoder/embedder/token/embedding"],
                                  flat(steps[1])["encoder/embedder/token/embedding"])
    with pytest.raises(FileNotFoundError, match="step 9"):
        init_from.load_params(f"{run}@9", target)


def test_scan_layout_target(pretrained):
    run, steps = pretrained
    target = init(TokenClassifier(tiny_bert(scan_layers=True), 5), 3)
    params = init_from.load_params(str(run), target)
    stacked = params["encoder"]["layers"]["attention"]["query"]["kernel"]
    assert stacked.shape == (2, 64, 4, 16)
    for i in range(2):
        np.testing.assert_array_equal(
            np.asarray(stacked[i]),
            np.asarray(steps[2]["encoder"][f"layer_{i}"]["attention"]["query"]["kernel"]))


def test_shape_mismatch_names_the_first_parameter(pretrained):
    run, _ = pretrained
    target = init(SequenceClassifier(tiny_bert(vocab_size=120), 3), 0)
    with pytest.raises(ValueError, match=r"encoder/embedder/token/embedding has shape "
                                         r"\(120, 64\) in the model but \(99, 64\)"):
        init_from.load_params(str(run), target)


def test_bad_specs(tmp_path, pretrained):
    run, _ = pretrained
    with pytest.raises(FileNotFoundError, match="not a directory"):
        init_from.load_params(str(tmp_path / "missing"), {})
    with pytest.raises(ValueError, match="neither a run directory"):
        init_from.load_params(str(tmp_path), {})
    unrelated = {"foo": {"kernel": jax.numpy.zeros((2, 2))}}
    with pytest.raises(ValueError, match="no parameter path matches"):
        init_from.load_params(str(run), unrelated)


def test_hf_and_converted_directories(tmp_path):
    """An HF BertModel (encoder + pooler) fills a classifier's encoder and pooler, directly
    and through `python -m lm.convert from-hf`."""
    cfg = tiny_bert()
    source = init(BertPretrainer(cfg), 5)
    convert.to_hf(cfg, source, str(tmp_path / "hf"), "BertModel")
    assert convert_cli.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "conv")]) == 0
    target = init(SequenceClassifier(cfg, 4), 0)
    want = flat(source)
    for spec in (tmp_path / "hf", tmp_path / "conv"):
        params, report = init_from.merge(init_from.load_source(str(spec)), target, str(spec))
        assert report.new == ["classifier/dense/bias", "classifier/dense/kernel"]
        assert report.unused == []
        got = flat(params)
        for name in report.loaded:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # and into a plain Encoder (paths without the encoder/ prefix); the pooler is unused
    params, report = init_from.merge(init_from.load_source(str(tmp_path / "hf")),
                                     init(Encoder(cfg), 0))
    assert report.new == [] and report.unused == ["pooler/dense/bias", "pooler/dense/kernel"]
    np.testing.assert_array_equal(flat(params)["embedder/token/embedding"],
                                  want["encoder/embedder/token/embedding"])


def char_lm_config(tmp_path: Path, **overrides):
    spec = importlib.util.spec_from_file_location("char_lm", ROOT / "configs" / "char_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("test")
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        rng = np.random.default_rng(0)
        words = ["to", "be", "or", "not", "that", "is", "the", "question"]
        corpus.write_text("".join(" ".join(rng.choice(words, 8)) + ".\n" for _ in range(400)))
    c.data.path = str(corpus)
    c.mesh.num_devices = 1
    c.train.async_checkpoint = False
    for key, value in overrides.items():
        section, leaf = key.split(".")
        c[section][leaf] = value
    return c


def test_training_run_starts_from_another_run(tmp_path):
    """train.train_and_evaluate with config.init_from = a run directory: with learning rate
    0 its step-1 checkpoint must hold exactly the parameters it started from."""
    first = tmp_path / "first"
    setup = train.build(char_lm_config(tmp_path), str(first))
    shapes = jax.eval_shape(setup.init_state).params
    rng = np.random.default_rng(0)
    save_run(first, {3: jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype),
                                     shapes)})
    second = tmp_path / "second"
    config = char_lm_config(tmp_path, **{"train.steps": 1, "optim.lr": 0.0,
                                         "optim.end_lr": 0.0, "optim.weight_decay": 0.0})
    config.init_from = str(first)
    train.train_and_evaluate(config, str(second))
    (want, _), (got, _) = (init_from.read_run_params(str(d)) for d in (first, second))
    assert flat(got).keys() == flat(want).keys()
    for name, value in flat(want).items():
        np.testing.assert_array_equal(flat(got)[name], value, err_msg=name)
