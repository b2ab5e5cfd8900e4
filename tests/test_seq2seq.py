"""Seq2seq data and objective: readers, packing (per-pair loss unchanged), lm.translate."""

import gzip
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from lm import config_check, train
from lm.data import seq2seq as s2s
from lm.data import tokenizers as tok_lib
from lm.errors import ConfigError
from lm.models.presets import preset
from lm.models.transformer import EncoderDecoder
from lm.objectives.seq2seq import Seq2Seq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EN = ["a dog runs", "two men talk", "a red car", "the cat sleeps", "a child plays",
      "people walk", "a big dog", "the man eats"]
DE = ["ein hund rennt", "zwei männer reden", "ein rotes auto", "die katze schläft",
      "ein kind spielt", "leute gehen", "ein großer hund", "der mann isst"]


def _write_parallel(tmp_path, n_repeat=8):
    for split, reps in (("train", n_repeat), ("val", 1)):
        for lang, lines in (("en", EN), ("de", DE)):
            with gzip.open(tmp_path / f"{split}.{lang}.gz", "wt", encoding="utf-8") as f:
                f.write("\n".join(lines * reps) + "\n")
    return str(tmp_path / "train"), str(tmp_path / "val")


def _data_cfg(**kw):
    return ConfigDict({**dict(format="parallel", source_lang="en", target_lang="de",
                              source_key="source", target_key="target"), **kw})


def test_readers_agree_across_formats(tmp_path):
    train_prefix, _ = _write_parallel(tmp_path, 1)
    parallel = s2s.read_pairs(_data_cfg(), train_prefix, "data.path")
    assert parallel[1] == s2s.Pair("two men talk", "zwei männer reden")
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("source\ttarget\n" + "".join(f"{a}\t{b}\n" for a, b in zip(EN, DE, strict=True)),
                   encoding="utf-8")
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps({"source": a, "target": b}) + "\n"
                             for a, b in zip(EN, DE, strict=True)), encoding="utf-8")
    assert s2s.read_pairs(_data_cfg(format="tsv"), str(tsv), "data.path") == parallel
    assert s2s.read_pairs(_data_cfg(format="jsonl"), str(jsonl), "data.path") == parallel


def test_misaligned_parallel_files_and_bad_format_are_one_line_errors(tmp_path):
    (tmp_path / "x.en").write_text("a\nb\n")
    (tmp_path / "x.de").write_text("a\n")
    with pytest.raises(ValueError, match="line-aligned"):
        s2s.read_pairs(_data_cfg(), str(tmp_path / "x"), "data.path")
    with pytest.raises(ValueError, match="data.format"):
        s2s.read_pairs(_data_cfg(format="csv"), str(tmp_path / "x"), "data.path")
    with pytest.raises(FileNotFoundError, match="data.val_path"):
        s2s.read_pairs(_data_cfg(), str(tmp_path / "missing"), "data.val_path")


def test_pack_layout():
    enc = [(np.array([3, 4, 6]), np.array([7, 6])), (np.array([5, 6]), np.array([8, 9, 6])),
           (np.array([9, 9, 9, 6]), np.array([6]))]
    rows = s2s.pack(enc, 6, 6, packed=True)
    assert len(rows["inputs"]) == 2  # the third pair does not fit beside the first two
    np.testing.assert_array_equal(rows["inputs"][0], [3, 4, 6, 5, 6, 0])
    np.testing.assert_array_equal(rows["input_segment_ids"][0], [1, 1, 1, 2, 2, 0])
    np.testing.assert_array_equal(rows["input_positions"][0], [0, 1, 2, 0, 1, 0])
    np.testing.assert_array_equal(rows["targets"][0], [7, 6, 8, 9, 6, 0])
    np.testing.assert_array_equal(rows["decoder_inputs"][0], [0, 7, 0, 8, 9, 0])
    np.testing.assert_array_equal(rows["target_positions"][0], [0, 1, 0, 1, 2, 0])
    np.testing.assert_array_equal(rows["weights"][0], [1, 1, 1, 1, 1, 0])


@pytest.mark.parametrize("position", ["relative", "learned"])
def test_a_packed_row_gives_each_pair_its_own_loss(position):
    rng = np.random.default_rng(0)
    enc = [(rng.integers(7, 50, n).astype(np.int32), rng.integers(7, 50, m).astype(np.int32))
           for n, m in ((5, 4), (3, 6), (6, 3))]
    packed = s2s.pack(enc, 16, 16, packed=True)
    alone = s2s.pack(enc, 16, 16, packed=False)
    assert len(packed["inputs"]) == 1 and len(alone["inputs"]) == 3
    cfg = preset("t5_small", num_layers=2, d_model=32, num_heads=2, head_dim=16, mlp_dim=64,
                 vocab_size=50, position=position, max_len=16, dropout_rate=0.0)
    obj = Seq2Seq(ConfigDict({"data": {"inputs_length": 16, "targets_length": 16},
                              "train": {}}))
    model = EncoderDecoder(cfg)
    params = obj.init(model, jax.random.key(0), obj.dummy_batch(1))["params"]

    def token_losses(rows):
        logits = obj.logits(model, params, rows)
        logp = jax.nn.log_softmax(logits.astype(np.float32))
        return -np.take_along_axis(np.asarray(logp), rows["targets"][..., None], -1)[..., 0]

    lp, la = token_losses(packed), token_losses(alone)
    seg = packed["target_segment_ids"][0]
    for k in range(3):
        got = lp[0][seg == k + 1]
        want = la[k][alone["weights"][k] > 0]
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    m = obj.metrics(model, params, packed, None, train=False)
    np.testing.assert_allclose(float(m["loss"][0]), lp[0][seg > 0].sum(), rtol=1e-5)
    assert float(m["loss"][1]) == 13  # padding never counted


def _config(tmp_path, train_prefix, val_prefix, **over):
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import translate_multi30k

    c = translate_multi30k.get_config("small,runlocal")
    c.data.update(path=train_prefix, val_path=val_prefix, vocab_size=400)
    c.data.update(inputs_length=16, targets_length=16)
    c.train.update(steps=4, batch_size=4, eval_every=2, checkpoint_every=2, log_every=1)
    c.evals.update(decode_every=4, decode_examples=4, decode_batch_size=4, max_batches=1)
    c.mesh.num_devices = 1
    for k, v in over.items():
        node, _, leaf = k.rpartition(".")
        c[node][leaf] = v
    return c


def test_training_decodes_in_the_loop_and_translate_prints_one_line_each(tmp_path):
    train_prefix, val_prefix = _write_parallel(tmp_path)
    c = _config(tmp_path, train_prefix, val_prefix)
    config_check.validate(c)
    workdir = str(tmp_path / "run")
    last = train.train_and_evaluate(c, workdir)
    for key in ("eval/bleu", "eval/chrf", "eval/rouge1", "eval/rougeL", "eval/accuracy"):
        assert key in last and np.isfinite(last[key])
    with open(os.path.join(workdir, "seq2seq.json")) as f:
        assert json.load(f)["target_lang"] == "de"
    tok = tok_lib.load_tokenizer(os.path.join(workdir, "tokenizer"))
    assert tok.special_id("</s>") is not None
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    run = subprocess.run([sys.executable, "-m", "lm.translate", "--workdir", workdir,
                          "--text", "a dog runs", "--text", "a red car", "--beam_size", "2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.rstrip("\n").split("\n")) == 2
    # the CLI's output equals the library's translation of the same texts
    from lm.objectives.seq2seq import translate
    from lm.translate import load_run

    cfg, params, tok, task = load_run(workdir, None)
    want = translate(cfg, params, tok, ["a dog runs", "a red car"], inputs_length=16,
                     max_len=16, beam_size=2, alpha=0.6, batch_size=2)
    assert run.stdout.rstrip("\n").split("\n") == want
    bad = subprocess.run([sys.executable, "-m", "lm.translate", "--workdir", workdir,
                          "--text", "x", "--source", "de"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert bad.returncode == 1
    assert bad.stderr.strip() == "error: --source=de: this run translates en -> de"


def test_decode_every_must_fall_on_an_evaluation(tmp_path):
    train_prefix, val_prefix = _write_parallel(tmp_path)
    c = _config(tmp_path, train_prefix, val_prefix, **{"evals.decode_every": 3})
    with pytest.raises(ConfigError, match="evals.decode_every: 3 must be a multiple"):
        config_check.validate(c)
