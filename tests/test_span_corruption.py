"""T5 span corruption: noise statistics, exact reconstruction, T5's lengths, determinism."""

import numpy as np
import pytest

from lm.data import span_corruption as sc


@pytest.mark.parametrize("inputs_length,raw,targets", [
    (512, 568, 114),  # T5's C4 setting
    (128, 141, 29),
    (256, 284, 58),  # 284: 43 noise in 14 spans -> 241 + 14 + 1 inputs
    (64, 70, 14),  # round(10.5) = 10 noise tokens (half to even, as T5)
])
def test_lengths_equal_t5s_helper(inputs_length, raw, targets):
    assert sc.span_lengths(inputs_length) == (raw, targets)
    ins, tgts = sc.corrupted_lengths(raw, 0.15, 3.0)
    assert ins <= inputs_length < sc.corrupted_lengths(raw + 1, 0.15, 3.0)[0]
    assert tgts == targets


def test_noise_fraction_and_mean_span_length_over_many_draws():
    rng = np.random.default_rng(0)
    noise, spans, total = 0, 0, 0
    for _ in range(2000):
        m = sc.noise_mask(568, 0.15, 3.0, rng)
        assert not m[0] and m[-1]  # non-noise first, noise last
        noise += m.sum()
        spans += (m & ~np.concatenate([[False], m[:-1]])).sum()
        total += len(m)
    assert abs(noise / total - 0.15) < 0.01
    assert abs(noise / spans - 3.0) < 0.2


def _reconstruct(inputs, targets, vocab):
    """Sentinel k in the inputs is replaced by the tokens after sentinel k in the targets."""
    spans, cur = {}, None
    for t in targets[:-1]:
        if t >= vocab - 100:
            cur = t
            spans[cur] = []
        else:
            spans[cur].append(t)
    out = []
    for t in inputs[:-1]:
        out.extend(spans[t] if t >= vocab - 100 else [t])
    return out


def test_inputs_and_targets_reconstruct_the_tokens_exactly():
    rng = np.random.default_rng(1)
    vocab, eos = 1100, 6
    for length in (10, 57, 141, 568):
        tokens = rng.integers(10, 1000, size=length)
        mask = sc.noise_mask(length, 0.15, 3.0, rng)
        inputs, targets = sc.corrupt(tokens, mask, vocab, eos)
        assert inputs[-1] == eos and targets[-1] == eos
        assert inputs[-2] >= vocab - 100  # inputs end with a sentinel (then </s>)
        assert targets[0] == vocab - 1  # <extra_id_0> is the last id
        sentinels = [t for t in inputs if t >= vocab - 100]
        assert sentinels == list(range(vocab - 1, vocab - 1 - len(sentinels), -1))
        assert _reconstruct(inputs, targets, vocab) == tokens.tolist()


def test_worked_example():
    tokens = np.arange(10, 18)
    mask = np.array([0, 0, 1, 1, 0, 0, 1, 1], bool)
    inputs, targets = sc.corrupt(tokens, mask, 100, 1)
    assert inputs.tolist() == [10, 11, 99, 14, 15, 98, 1]
    assert targets.tolist() == [99, 12, 13, 98, 16, 17, 1]


def test_examples_fill_the_lengths_and_are_deterministic():
    cfg = sc.make_span_config(128, 0.15, 3.0, vocab_size=600, eos_id=6)
    chunks = sc.RawChunks(np.arange(10, 10 + 141 * 5) % 500 + 10, cfg.raw_length)
    ev = sc.CorruptedEval(chunks, cfg, seed=3)
    a, b = ev[2], sc.CorruptedEval(chunks, cfg, seed=3)[2]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["input_segment_ids"].sum() == 128  # raw length chosen to fill the inputs
    assert a["target_segment_ids"].sum() == 29
    assert a["decoder_inputs"][0] == 0
    np.testing.assert_array_equal(a["decoder_inputs"][1:], a["targets"][:-1])
    c = sc.CorruptedEval(chunks, cfg, seed=4)[2]
    assert not np.array_equal(a["inputs"], c["inputs"])


def test_prefix_lm_row_puts_the_loss_on_the_targets():
    cfg = sc.make_span_config(16, 0.15, 3.0, vocab_size=200, eos_id=6)
    ex = sc.example(np.arange(10, 10 + cfg.raw_length), cfg, np.random.default_rng(0))
    n_in, n_tgt = int(ex["input_segment_ids"].sum()), int(ex["target_segment_ids"].sum())
    row = sc.as_prefix_lm(ex, 16 + cfg.targets_length)
    predicted = row["targets"][row["weights"] > 0]
    np.testing.assert_array_equal(predicted, ex["targets"][:n_tgt])
    assert row["prefix"].sum() == n_in
    np.testing.assert_array_equal(row["inputs"][:n_in], ex["inputs"][:n_in])
