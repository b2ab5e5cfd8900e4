"""Span-corruption pretraining end to end: batches, training, exact resume, prefix LM."""

import importlib.util
import os
import shutil

import jax
import numpy as np

from lm import checkpoint, config_check, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the a dog cat runs sleeps in on park house red big small man woman child sees "
         "eats plays with and").split()


def _config(tmp_path, arch="encoder_decoder", **over):
    spec = importlib.util.spec_from_file_location("t5cfg", os.path.join(ROOT, "configs/t5.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(f"small,runlocal,arch={arch}")
    rng = np.random.default_rng(0)
    text = "\n".join(" ".join(rng.choice(WORDS, 12)) for _ in range(400)) + "\n"
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "valid.txt").write_text(text[:4000])
    c.data.update(path=str(tmp_path / "train.txt"), val_path=str(tmp_path / "valid.txt"))
    c.mesh.num_devices = 1
    c.train.update(steps=4, eval_every=2, checkpoint_every=2, log_every=1,
                   async_checkpoint=False)
    for k, v in over.items():
        node, _, leaf = k.rpartition(".")
        c[node][leaf] = v
    config_check.validate(c)
    return c


def test_batches_hold_sentinels_from_the_vocab_top(tmp_path):
    c = _config(tmp_path)
    setup = train.build(c, str(tmp_path / "run"))
    tok_vocab = setup.data.tokenizer.vocab_size
    assert setup.model_cfg.vocab_size == tok_vocab + 100
    batch = next(setup.data.train_iter)
    eos = setup.data.tokenizer.special_id("</s>")
    for row in range(batch["inputs"].shape[0]):
        n = int(batch["input_segment_ids"][row].sum())
        assert n == 32  # the raw length fills the inputs exactly
        inputs, targets = batch["inputs"][row][:n], batch["targets"][row]
        assert inputs[-1] == eos and inputs[-2] >= tok_vocab
        assert targets[0] == tok_vocab + 99  # <extra_id_0>
        sentinels = inputs[inputs >= tok_vocab]
        np.testing.assert_array_equal(sentinels, tok_vocab + 99 - np.arange(len(sentinels)))


def test_training_resumes_exactly(tmp_path):
    straight = tmp_path / "straight"
    resumed = tmp_path / "resumed"
    train.train_and_evaluate(_config(tmp_path), str(straight))
    train.train_and_evaluate(_config(tmp_path), str(resumed))
    shutil.rmtree(resumed / "checkpoints" / "4")  # as if killed after step 2's checkpoint
    last = train.train_and_evaluate(_config(tmp_path), str(resumed))  # steps 3-4 again
    assert np.isfinite(last["eval/loss"]) and "eval/accuracy" in last

    def params(workdir):
        ckpt = checkpoint.Checkpointer(str(workdir), max_to_keep=2, save_every=2)
        state = train.build(_config(tmp_path), str(workdir)).init_state()
        return ckpt.restore_latest(checkpoint.abstract_like(state))[1].params

    for a, b in zip(jax.tree.leaves(params(straight)), jax.tree.leaves(params(resumed)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_prefix_lm_trains_a_decoder_with_loss_on_the_targets(tmp_path):
    c = _config(tmp_path, arch="prefix_lm")
    setup = train.build(c, str(tmp_path / "run"))
    assert type(setup.model).__name__ == "Decoder"
    batch = next(setup.data.train_iter)
    assert batch["inputs"].shape[1] == 32 + 8  # inputs + targets (34 raw -> 32 + 8)
    for row in range(batch["inputs"].shape[0]):
        prefix = int(batch["prefix"][row].sum())
        weights = batch["weights"][row]
        assert prefix == 32 and weights[: prefix - 1].sum() == 0 and weights.sum() == 8
    last = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert np.isfinite(last["eval/loss"])
