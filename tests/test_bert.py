"""BERT pretraining objective: MLM loss over chosen positions only, golden losses after one
step, the required metrics, exact resume (static and dynamic masking), data caching."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import objectives, train
from lm.data.bert_pipeline import BertDataOptions, build_bert_data, make_train_iterator
from lm.models.heads import MLMHead
from lm.models.presets import preset
from lm.objectives.bert import mlm_metrics, pretraining_metrics

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["the", "king", "queen", "speaks", "to", "all", "men", "of", "rome", "and", "we",
         "shall", "not", "fear", "thee", "my", "lord", "good", "night", "run", "walk"]
PIECES = ["##ing", "##s", "##ed"]  # "runs" -> run ##s
REQUIRED = ("train/mlm_loss", "train/nsp_loss", "eval/mlm_loss", "eval/mlm_accuracy",
            "eval/nsp_loss", "eval/nsp_accuracy")


def write_corpus(tmp_path: Path, name: str, num_docs: int, seed: int) -> str:
    """Blank-line-separated documents of sentences over WORDS (some with ## suffixes)."""
    rng = np.random.default_rng(seed)
    vocab = WORDS + [w + s[2:] for w in ("run", "walk") for s in PIECES]
    docs = []
    for _ in range(num_docs):
        sentences = [" ".join(rng.choice(vocab, size=rng.integers(4, 10))) + " ."
                     for _ in range(rng.integers(3, 7))]
        docs.append("\n".join(sentences))
    path = tmp_path / name
    path.write_text("\n\n".join(docs) + "\n")
    return str(path)


def write_vocab(tmp_path: Path) -> str:
    path = tmp_path / "vocab.txt"
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS, *PIECES]
    path.write_text("".join(t + "\n" for t in tokens))
    return str(path)


def bert_config(tmp_path: Path, variant: str = "tiny,runlocal", **overrides):
    spec = importlib.util.spec_from_file_location("bert_config", ROOT / "configs" / "bert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(variant)
    c.data.path = write_corpus(tmp_path, "train.txt", 40, seed=0)
    c.data.val_path = ""  # a seeded held-out 10 % of the documents
    c.data.tokenizer_path = write_vocab(tmp_path)  # trained vocabularies are not bit-stable
    c.mesh.num_devices = 1
    c.train.async_checkpoint = False
    c.train.update(log_every=1, eval_every=2, checkpoint_every=2)
    for key, value in overrides.items():
        section, leaf = key.split(".")
        c[section][leaf] = value
    return c


def read_metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def train_losses(workdir: Path) -> dict[int, tuple[float, float]]:
    return {m["step"]: (m["train/mlm_loss"], m["train/nsp_loss"])
            for m in read_metrics(workdir) if "train/mlm_loss" in m}


# ------------------------------------------------------------ MLM: chosen positions only
def test_mlm_loss_ignores_unchosen_positions():
    rng = np.random.default_rng(0)
    b, p, v = 3, 5, 11
    logits = rng.normal(size=(b, p, v)).astype(np.float32)
    weights = (rng.random((b, p)) < 0.6).astype(np.float32)
    weights[0, 0] = 1.0
    batch = {"masked_ids": rng.integers(0, v, (b, p)).astype(np.int32),
             "masked_weights": weights, "nsp_label": np.array([0, 1, -1], np.int32)}
    nsp = rng.normal(size=(b, 2)).astype(np.float32)
    ref = pretraining_metrics(jnp.asarray(logits), jnp.asarray(nsp), batch, 1.0)
    noisy = np.where(weights[..., None] > 0, logits, 1e4 * rng.normal(size=logits.shape))
    nsp_noisy = nsp.copy()
    nsp_noisy[2] = [1e4, -1e4]  # the unlabelled example
    got = pretraining_metrics(jnp.asarray(noisy, jnp.float32), jnp.asarray(nsp_noisy), batch,
                              1.0)
    for name in ref:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(ref[name]), name)
    assert float(ref["mlm_loss"][1]) == weights.sum() and float(ref["nsp_loss"][1]) == 2.0
    # ... and a chosen position does count.
    noisy[0, 0, batch["masked_ids"][0, 0]] += 5.0
    moved = pretraining_metrics(jnp.asarray(noisy, jnp.float32), jnp.asarray(nsp), batch, 1.0)
    assert float(moved["mlm_loss"][0]) != float(ref["mlm_loss"][0])


def test_mlm_head_reads_only_the_gathered_positions():
    cfg = preset("bert_tiny", vocab_size=50)
    head = MLMHead(cfg)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 12, cfg.d_model)), jnp.float32)
    positions = jnp.array([[1, 4, 7], [0, 2, 11]], jnp.int32)
    table = jnp.asarray(rng.normal(size=(50, cfg.d_model)), jnp.float32)
    params = head.init(jax.random.key(0), x, positions, table)
    out = head.apply(params, x, positions, table)
    assert out.shape == (2, 3, 50) and out.dtype == jnp.float32
    chosen = np.zeros((2, 12), bool)
    np.put_along_axis(chosen, np.asarray(positions), True, axis=1)
    other = jnp.where(jnp.asarray(chosen)[..., None], x, 100.0 * x + 3.0)
    np.testing.assert_array_equal(head.apply(params, other, positions, table), out)
    grad = jax.grad(lambda h: head.apply(params, h, positions, table).sum())(x)
    assert np.all(np.asarray(grad)[~chosen] == 0) and np.all(
        np.abs(np.asarray(grad)[chosen]).sum(-1) > 0)


def test_no_nsp_means_no_head_and_no_nsp_metrics(tmp_path):
    c = bert_config(tmp_path, **{"data.nsp_mode": "none"})
    objective = objectives.get(c)
    model = objective.build_model(preset("bert_tiny", vocab_size=40))
    batch = objective.dummy_batch(2)
    params = jax.eval_shape(lambda: objective.init(model, jax.random.key(0), batch))["params"]
    assert set(params) == {"encoder", "mlm"}
    metrics = jax.eval_shape(lambda p: objective.metrics(model, p, batch, None, train=False),
                             params)
    assert set(metrics) == {"loss", "mlm_loss", "mlm_accuracy"}


@pytest.mark.parametrize("field,value", [("nsp_mode", "nspp"), ("mask_prob", 0.0),
                                         ("max_predictions", 500), ("nsp_weight", -1.0),
                                         ("whole_word", True)])
def test_bad_config_names_the_field(tmp_path, field, value):
    overrides = {f"data.{field}": value}
    if field == "whole_word":
        overrides["data.tokenizer"] = "char"
    with pytest.raises(ValueError, match=f"data.{field}"):
        objectives.get(bert_config(tmp_path, **overrides))


# ------------------------------------------------------------------ golden numbers
def test_golden_losses_and_required_metrics(tmp_path):
    c = bert_config(tmp_path, **{"train.steps": 2})
    train.train_and_evaluate(c, str(tmp_path / "run"))
    got = train_losses(tmp_path / "run")
    # Step 1: the losses at initialisation; step 2: after one AdamW update.
    np.testing.assert_allclose([*got[1], *got[2]], GOLDEN, rtol=1e-4)
    keys = set().union(*read_metrics(tmp_path / "run"))
    assert set(REQUIRED) <= keys, set(REQUIRED) - keys


GOLDEN = [3.425922, 0.683706, 3.286143, 0.601152]  # [mlm, nsp] at step 1, then at step 2


# ------------------------------------------------------------------ resume and data
@pytest.mark.parametrize("dynamic", [False, True])
def test_resume_through_the_trainer_is_exact(tmp_path, dynamic):
    # Few pairs, so 4 steps of 8 cross epoch boundaries (where dynamic masks change).
    over = {"data.dynamic_masking": dynamic, "optim.decay_steps": 4, "data.val_fraction": 0.3}
    c = bert_config(tmp_path, **over, **{"train.steps": 4})
    c.data.path = write_corpus(tmp_path, "small.txt", 12, seed=1)
    train.train_and_evaluate(c, str(tmp_path / "straight"))
    c.train.steps = 2
    train.train_and_evaluate(c, str(tmp_path / "split"))
    c.train.steps = 4
    train.train_and_evaluate(c, str(tmp_path / "split"))
    straight, split = train_losses(tmp_path / "straight"), train_losses(tmp_path / "split")
    assert sorted(straight) == [1, 2, 3, 4] and straight == split
    # The checkpointed iterator positions agree too (grain state JSON, one per process).
    data = [(tmp_path / name / "checkpoints" / "4" / "data" / "process_0-of-1.json").read_text()
            for name in ("straight", "split")]
    assert data[0] == data[1]


def small_data_options(tmp_path: Path, dynamic: bool) -> BertDataOptions:
    return BertDataOptions(path=write_corpus(tmp_path, "c.txt", 12, seed=1), val_fraction=0.3,
                           tokenizer_path=write_vocab(tmp_path), seq_len=32, max_predictions=5,
                           dynamic_masking=dynamic)


def original(batch: dict[str, np.ndarray]) -> bytes:
    """The first row's unmasked sequence: it identifies the pair."""
    ids = batch["input_ids"][0].copy()
    ids[batch["masked_positions"][0]] = batch["masked_ids"][0]
    return ids.tobytes()


@pytest.mark.parametrize("dynamic", [False, True])
def test_epochs_masks_and_iterator_state(tmp_path, dynamic):
    opts = small_data_options(tmp_path, dynamic)
    data = build_bert_data(opts, workdir=str(tmp_path / "w"), batch_size=4, seed=3)
    again = build_bert_data(opts, workdir=str(tmp_path / "w"), batch_size=4, seed=3)  # cached
    assert [p.tokens_b.tolist() for p in again.train_source.pairs] == [
        p.tokens_b.tolist() for p in data.train_source.pairs]
    n = len(data.train_source.pairs)
    it = make_train_iterator(data.train_source, batch_size=1, seed=3, process_index=0,
                             process_count=1)
    items = [next(it) for _ in range(2 * n)]

    epochs = [items[:n], items[n:]]
    assert len({original(x) for x in epochs[0]}) == n  # an epoch shows every pair once
    first = {original(x): x["masked_positions"][0].tobytes() for x in epochs[0]}
    second = {original(x): x["masked_positions"][0].tobytes() for x in epochs[1]}
    assert first.keys() == second.keys()
    assert (first != second) == dynamic  # fresh masks each epoch only when dynamic
    # Resume from any point gives the same batches.
    it = make_train_iterator(data.train_source, batch_size=4, seed=3, process_index=0,
                             process_count=1)
    batches = [next(it) for _ in range(6)]
    resumed = make_train_iterator(again.train_source, batch_size=4, seed=3, process_index=0,
                                  process_count=1)
    it = make_train_iterator(data.train_source, batch_size=4, seed=3, process_index=0,
                             process_count=1)
    for _ in range(3):
        next(it)
    resumed.set_state(it.get_state())
    for a, b in zip(batches[3:], [next(resumed) for _ in range(3)], strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], k)
    # Evaluation: static, padded to whole batches, the same on every pass.
    e1, e2 = list(data.eval_batches()), list(data.eval_batches())
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(e1, e2, strict=True) for k in a)
    labels = np.concatenate([b["nsp_label"] for b in e1])
    assert (labels >= 0).sum() == len(data.eval_source.pairs)


def test_processes_read_disjoint_shards(tmp_path):
    data = build_bert_data(small_data_options(tmp_path, True), workdir=str(tmp_path / "w"),
                           batch_size=2, seed=3)
    per_process = len(data.train_source.pairs) // 2
    seen = []
    for index in range(2):
        it = make_train_iterator(data.train_source, batch_size=2, seed=3, process_index=index,
                                 process_count=2)
        seen.append({original(next(it)) for _ in range(per_process)})
    assert len(seen[0]) == len(seen[1]) == per_process and not seen[0] & seen[1]


def test_mlm_accuracy_counts_the_target_being_largest():
    """Correct where the target's logit is the maximum (an exact tie counts), weighted,
    over chosen positions only; the loss is the weighted cross-entropy."""
    logits = jnp.array([[[0.0, 2.0, 1.0], [3.0, 1.0, 0.0], [1.0, 1.0, 0.0],
                         [9.0, 0.0, 0.0]]])
    ids = jnp.array([[1, 2, 1, 1]])  # right, wrong, tie, (not chosen)
    weights = jnp.array([[1.0, 2.0, 1.0, 0.0]])
    m = mlm_metrics(logits, ids, weights)
    acc_sum, count = m["mlm_accuracy"]
    assert float(count) == 4.0 and float(acc_sum) == 2.0  # 1 (right) + 1 (tie)
    lse = jax.nn.logsumexp(logits[0], -1)
    want = (lse[0] - 2.0) + 2 * (lse[1] - 0.0) + (lse[2] - 1.0)
    np.testing.assert_allclose(float(m["mlm_loss"][0]), float(want), rtol=1e-6)

