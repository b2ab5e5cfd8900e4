"""Beam search: exhaustive-search equivalence, greedy at beam 1, independent rows, both
model kinds."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.generate import beam_search, generate, length_penalty
from lm.models.presets import preset
from lm.models.transformer import Decoder, EncoderDecoder, stack_layers

EOS, V = 1, 5


def _encdec():
    cfg = preset("t5_small", num_layers=1, num_decoder_layers=1, d_model=16, num_heads=2,
                 head_dim=8, mlp_dim=32, vocab_size=V, dropout_rate=0.0)
    model = EncoderDecoder(cfg)
    src = np.array([[2, 3, 4, 1, 0], [3, 3, 2, 0, 0], [4, 2, 1, 0, 0]], np.int32)
    params = model.init(jax.random.key(1), src, src[:, :3])["params"]
    params = jax.tree.map(lambda x: x * 6, params)  # peaked, varied distributions
    return cfg, model, params, src


def _encdec_logps(model, params, src_row, hyps):
    """log p(hyp | src) of every hypothesis, in one teacher-forced forward pass."""
    n = max(len(h) for h in hyps)
    tgt = np.array([[*h, *[0] * (n - len(h))] for h in hyps], np.int32)
    dec_in = np.concatenate([np.zeros((len(hyps), 1), np.int32), tgt[:, :-1]], axis=1)
    src = np.repeat(src_row[None], len(hyps), axis=0)
    logits = model.apply({"params": params}, src, dec_in,
                         input_segment_ids=(src != 0).astype(np.int32))
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))
    picked = np.take_along_axis(logp, tgt[:, :, None], axis=2)[:, :, 0]
    lengths = np.array([len(h) for h in hyps])
    return (picked * (np.arange(n)[None] < lengths[:, None])).sum(1)


def _hypotheses(max_len):
    """Every output: ends with EOS within max_len tokens, or runs max_len tokens."""
    for n in range(1, max_len + 1):
        for seq in itertools.product(range(V), repeat=n):
            if EOS not in seq[:-1] and (seq[-1] == EOS or n == max_len):
                yield seq


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.5])
def test_beam_search_equals_exhaustive_search(alpha):
    cfg, model, params, src = _encdec()
    max_len = 3
    seqs, scores = beam_search(cfg, params, src, beam_size=16, alpha=alpha, max_len=max_len,
                               eos_id=EOS)
    hyps = list(_hypotheses(max_len))
    penalty = np.array([float(length_penalty(len(h), alpha)) for h in hyps])
    for row in range(len(src)):
        scored = _encdec_logps(model, params, src[row], hyps) / penalty
        ranked = sorted(zip(scored, hyps, strict=True), reverse=True)
        for k in range(4):
            want_score, want = ranked[k]
            got = [int(t) for t in seqs[row, k]][: len(want)]
            assert tuple(got) == want, (row, k)
            np.testing.assert_allclose(scores[row, k], want_score, rtol=1e-5)


def _naive_greedy(model, params, src_row, max_len):
    """Argmax of full teacher-forced forward passes, the decoder input zero-padded to one
    length (causal: the padding cannot reach the position read) so it compiles once."""
    forward = jax.jit(lambda src, dec_in: model.apply(
        {"params": params}, src, dec_in, input_segment_ids=(src != 0).astype(np.int32)))
    out = []
    while len(out) < max_len:
        dec_in = np.zeros((1, max_len + 1), np.int32)
        dec_in[0, 1:len(out) + 1] = out
        logits = forward(src_row[None], dec_in)
        out.append(int(jnp.argmax(logits[0, len(out)])))
        if out[-1] == EOS:
            break
    return out


def test_beam_one_is_greedy_and_rows_are_independent():
    cfg, model, params, src = _encdec()
    seqs, _ = beam_search(cfg, params, src, beam_size=1, alpha=0.6, max_len=6, eos_id=EOS)
    for row in range(len(src)):
        want = _naive_greedy(model, params, src[row], 6)
        assert [int(t) for t in seqs[row, 0, : len(want)]] == want
        assert not seqs[row, 0, len(want):].any()
    wide, wide_scores = beam_search(cfg, params, src, beam_size=3, max_len=6, eos_id=EOS)
    for row in range(len(src)):  # each row alone gives what it gave in the batch
        alone, alone_scores = beam_search(cfg, params, src[row:row + 1], beam_size=3,
                                          max_len=6, eos_id=EOS)
        np.testing.assert_array_equal(alone[0], wide[row])
        # fp32 products are blocked differently for 1 and 3 rows: rounding, not leakage
        np.testing.assert_allclose(alone_scores[0], wide_scores[row], rtol=5e-5, atol=1e-6)


def test_decoder_only_beam_search():
    cfg = preset("gpt2_small", num_layers=1, d_model=16, num_heads=2, mlp_dim=32,
                 vocab_size=V, max_len=16, dropout_rate=0.0, attention_dropout_rate=0.0)
    model = Decoder(cfg)
    prompt = np.array([[2, 3], [4, 4]], np.int32)
    params = jax.tree.map(lambda x: x * 6, model.init(jax.random.key(2), prompt)["params"])
    greedy = generate(cfg, params, prompt, max_new_tokens=4, temperature=0.0)
    seqs, _ = beam_search(cfg, params, prompt, beam_size=1, max_len=4, eos_id=-1,
                          decoder_only=True)  # no EOS: greedy runs the full length
    np.testing.assert_array_equal(seqs[:, 0], greedy[:, 2:])
    seqs, scores = beam_search(cfg, params, prompt, beam_size=16, alpha=0.0, max_len=2,
                               eos_id=EOS, decoder_only=True)
    for row in range(2):
        def logp(seq, row=row):
            ids = np.array([[*prompt[row], *seq]], np.int32)
            lp = jax.nn.log_softmax(model.apply({"params": params}, ids)[0].astype(jnp.float32))
            return float(sum(lp[1 + t, s] for t, s in enumerate(seq)))
        best = max(_hypotheses(2), key=logp)
        assert tuple(int(t) for t in seqs[row, 0, : len(best)]) == best
        np.testing.assert_allclose(scores[row, 0], logp(best), rtol=1e-5)


def test_scanned_layers_search_like_the_loop():
    """Reordering beams reorders the cache of every layer, stacked (scan) or not: a scanned
    stack's cache has its rows on axis 1, which a first-axis gather used to miss."""
    cfg = preset("gpt2_small", num_layers=2, d_model=16, num_heads=2, mlp_dim=32,
                 vocab_size=7, max_len=16, dropout_rate=0.0, attention_dropout_rate=0.0)
    prompt = np.array([[2, 3], [4, 4]], np.int32)
    params = nn.unbox(Decoder(cfg).init(jax.random.key(2), prompt)["params"])
    params = jax.tree.map(lambda x: x * 6, params)
    kw = dict(beam_size=3, max_len=5, eos_id=EOS, decoder_only=True)
    seqs, scores = beam_search(cfg, params, prompt, **kw)
    seqs_s, scores_s = beam_search(cfg.replace(scan_layers=True), stack_layers(params),
                                   prompt, **kw)
    np.testing.assert_array_equal(seqs_s, seqs)
    np.testing.assert_allclose(scores_s, scores, rtol=1e-5)


def test_bad_arguments_name_the_field():
    cfg, _, params, src = _encdec()
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(cfg, params, src, beam_size=0, max_len=3, eos_id=EOS)
    with pytest.raises(ValueError, match="length_penalty"):
        beam_search(cfg, params, src, alpha=-1.0, max_len=3, eos_id=EOS)
