"""T5 weights: parity with transformers' T5ForConditionalGeneration / T5EncoderModel for the
v1.0 (ReLU, tied output scaled by d_model**-0.5) and v1.1 (gated GELU, untied, unscaled)
layouts, with padding and through the KV cache; exact round trips; the T5 sentencepiece
tokenizer with its extra ids; unrepresentable configs.

Tests that need torch / transformers skip without them (pip install -e .[hf])."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is imported

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import convert
from lm.convert import __main__ as cli
from lm.data.tokenizers import SentencePieceTokenizer, load_tokenizer
from lm.models import Encoder, EncoderDecoder, preset, stack_layers
from tests import test_convert as bert_tests
from tests.test_convert import assert_trees_equal, max_diff

B, S, T, V = 3, 12, 10, 99
SRC_LENGTHS = np.array([12, 7, 3])  # encoder right padding in rows 1 and 2
TGT_LENGTHS = np.array([10, 10, 6])  # decoder padding in row 2
# 8 buckets (exact up to distance 2 each way in the encoder, 4 in the decoder) with max
# distance 20: the log-spaced buckets are exercised on both sides.
SHAPE = dict(vocab_size=V, d_model=32, num_heads=4, head_dim=8, mlp_dim=64, num_layers=2,
             num_decoder_layers=3, max_len=40, relative_buckets=8, relative_max_distance=20)
LAYOUTS = {
    "v1.0": dict(activation="relu", tie_embeddings=True, scale_tied_logits=True),
    "v1.1": dict(activation="geglu_tanh", tie_embeddings=False, scale_tied_logits=False),
}
HF_LAYOUTS = {"v1.0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
              "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)}


def tiny_t5(layout: str = "v1.0", **kw):
    # T5 applies its dropout rate to the attention probabilities too.
    return preset("t5_small", **{**SHAPE, **LAYOUTS[layout], "attention_dropout_rate": 0.1,
                                 **kw})


def batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    src = rng.integers(0, V, (B, S)).astype(np.int32)
    tgt = rng.integers(0, V, (B, T)).astype(np.int32)
    src_mask = (np.arange(S)[None] < SRC_LENGTHS[:, None]).astype(np.int32)
    tgt_mask = (np.arange(T)[None] < TGT_LENGTHS[:, None]).astype(np.int32)
    return src, src_mask, tgt, tgt_mask


def random_params(module, seed: int = 0):
    """Every leaf random (no unit norm scales hiding a swapped mapping), shapes from
    `eval_shape` (nothing compiled)."""
    ids = np.zeros((1, 8), np.int32)
    args = (ids, ids) if isinstance(module, EncoderDecoder) else (ids,)
    return bert_tests.random_params(module, seed, scale=0.3, args=args)


def cached_logits(cfg, params, encoded, src_mask, tgt, prompt: int = 3) -> np.ndarray:
    """Decoder logits fed through the KV cache: a prompt, then one token at a time."""
    model = EncoderDecoder(cfg, decode_mode=True, cache_len=T)
    cache = model.init(jax.random.key(0), tgt[:, :1], tgt[:, :1])["cache"]
    outs = []
    for start, stop in [(0, prompt)] + [(t, t + 1) for t in range(prompt, T)]:
        pos = np.broadcast_to(np.arange(start, stop, dtype=np.int32), (B, stop - start))
        logits, upd = model.apply({"params": params, "cache": cache}, encoded,
                                  tgt[:, start:stop], None, pos, encoder_segment_ids=src_mask,
                                  mutable=["cache"], method=EncoderDecoder.decode)
        cache = upd["cache"]
        outs.append(np.asarray(logits))
    return np.concatenate(outs, axis=1)


# ------------------------------------------------------------------ round trips (numpy)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_encoder_decoder_round_trip_is_bit_exact(tmp_path, layout):
    cfg = tiny_t5(layout, init_std=0.02 if layout == "v1.1" else 0.05)
    params = random_params(EncoderDecoder(cfg))
    assert convert.to_hf(cfg, params, str(tmp_path)) == "T5ForConditionalGeneration"
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    assert hf_cfg["feed_forward_proj"] == HF_LAYOUTS[layout]["feed_forward_proj"]
    got_cfg, back, info = convert.from_hf(str(tmp_path))
    assert (info.model_class, info.hf_class) == ("EncoderDecoder", "T5ForConditionalGeneration")
    assert info.unused == () and not info.extras
    assert got_cfg == cfg
    assert_trees_equal(params, back)
    assert isinstance(info.build_model(got_cfg), EncoderDecoder)


def test_encoder_round_trip_and_encoder_only_export(tmp_path):
    cfg = tiny_t5("v1.1")
    enc = random_params(Encoder(cfg))
    assert convert.to_hf(cfg, enc, str(tmp_path / "enc")) == "T5EncoderModel"
    got_cfg, back, info = convert.from_hf(str(tmp_path / "enc"))
    assert (info.model_class, info.hf_class) == ("Encoder", "T5EncoderModel")
    assert got_cfg.replace(tie_embeddings=False) == cfg and info.unused == ()
    assert_trees_equal(enc, back)
    # The encoder half of an EncoderDecoder (scan layout) as a T5EncoderModel.
    full = random_params(EncoderDecoder(cfg), seed=1)
    convert.to_hf(cfg, stack_layers(full), str(tmp_path / "half"), "T5EncoderModel")
    _, back, _ = convert.from_hf(str(tmp_path / "half"))
    assert_trees_equal({"embedder": full["embedder"], **full["encoder"]}, back)


@pytest.mark.parametrize("cfg,kind,needle", [
    (tiny_t5(scale_attention=True), "T5ForConditionalGeneration", "model.scale_attention"),
    (tiny_t5(use_bias=True), "T5ForConditionalGeneration", "model.use_bias"),
    (tiny_t5(activation="geglu"), "T5ForConditionalGeneration", "model.activation"),
    (tiny_t5(scale_tied_logits=False), "T5ForConditionalGeneration",
     "model.scale_tied_logits"),
    (tiny_t5(num_kv_heads=2), "T5EncoderModel", "model.num_kv_heads"),
])
def test_unrepresentable_configs_fail_naming_the_field(tmp_path, cfg, kind, needle):
    module = EncoderDecoder(cfg) if kind.endswith("Generation") else Encoder(cfg)
    with pytest.raises(ValueError, match=needle) as e:
        convert.to_hf(cfg, random_params(module), str(tmp_path), kind)
    assert len(str(e.value).splitlines()) == 1


def test_unsupported_hf_config_is_one_line_naming_the_field(tmp_path, capsys):
    cfg = tiny_t5()
    convert.to_hf(cfg, random_params(EncoderDecoder(cfg)), str(tmp_path / "hf"))
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(
        {**hf_cfg, "feed_forward_proj": "gated-relu"}))
    with pytest.raises(ValueError, match="feed_forward_proj='gated-relu'"):
        convert.from_hf(str(tmp_path / "hf"))
    assert cli.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "dst")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "feed_forward_proj" in err, err
    assert not (tmp_path / "dst").exists()


def test_cli_from_hf_writes_params_and_tokenizer(tmp_path, capsys):
    cfg = tiny_t5("v1.1")
    params = random_params(EncoderDecoder(cfg))
    convert.to_hf(cfg, params, str(tmp_path / "hf"))
    train_spm(tmp_path / "hf")
    assert cli.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "dst")]) == 0
    out = capsys.readouterr().out
    assert "T5ForConditionalGeneration -> EncoderDecoder" in out and "tokenizer/" in out
    meta = json.loads((tmp_path / "dst" / "model_config.json").read_text())
    assert meta["model_class"] == "EncoderDecoder" and meta["model"]["activation"] == "geglu_tanh"
    flat, _ = convert.files.load_converted(str(tmp_path / "dst"))
    assert_trees_equal(params, convert.unflatten(flat))
    tok = load_tokenizer(str(tmp_path / "dst" / "tokenizer"))  # what a run's data layer loads
    assert tok.extra_ids == 100 and tok.special_id("<extra_id_0>") == tok.vocab_size - 1


# ------------------------------------------------------------------ parity with transformers
def hf_t5(transformers, torch, layout: str, encoder_only: bool = False, **kw):
    """A random tiny HF T5 in eval mode, every parameter moved off its init; v1.1 gets its
    own lm_head (transformers >= 5 builds it tied and unties on load when they differ),
    of std d_model**-0.5 so that logits stay O(10) and fp32 rounding stays below 1e-4."""
    hf_cfg = transformers.T5Config(
        vocab_size=V, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
        num_decoder_layers=3, relative_attention_num_buckets=8,
        relative_attention_max_distance=20, dropout_rate=0.1,
        decoder_start_token_id=0, **{**HF_LAYOUTS[layout], **kw})
    cls = transformers.T5EncoderModel if encoder_only else transformers.T5ForConditionalGeneration
    model = cls(hf_cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        if layout == "v1.1" and not encoder_only:
            model.lm_head.weight = torch.nn.Parameter(
                torch.randn_like(model.lm_head.weight) * hf_cfg.d_model**-0.5)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_t5_parity_with_transformers(tmp_path, layout):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = hf_t5(transformers, torch, layout)
    hf.save_pretrained(tmp_path)
    cfg, params, info = convert.from_hf(str(tmp_path))
    assert info.model_class == "EncoderDecoder" and info.unused == ()
    assert cfg.activation == LAYOUTS[layout]["activation"]
    assert (cfg.tie_embeddings, cfg.scale_tied_logits) == (layout == "v1.0",) * 2
    assert ("lm_head" in params["decoder"]) == (layout == "v1.1")

    src, src_mask, tgt, tgt_mask = batch()
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(src, dtype=torch.long),
                 attention_mask=torch.tensor(src_mask),
                 decoder_input_ids=torch.tensor(tgt, dtype=torch.long),
                 decoder_attention_mask=torch.tensor(tgt_mask))
    model = EncoderDecoder(cfg)
    v = {"params": params}
    encoded = model.apply(v, src, src_mask, method=EncoderDecoder.encode)
    logits = model.apply(v, src, tgt, input_segment_ids=src_mask, target_segment_ids=tgt_mask)
    cached = cached_logits(cfg, params, encoded, src_mask, jnp.asarray(tgt))
    src_valid, tgt_valid = src_mask.astype(bool), tgt_mask.astype(bool)
    diffs = {"encoder_hidden": max_diff(encoded, out.encoder_last_hidden_state.numpy(),
                                        src_valid),
             "logits": max_diff(logits, out.logits.numpy(), tgt_valid),
             "cached_logits": max_diff(cached, out.logits.numpy(), tgt_valid)}
    print(f"t5 {layout} parity max abs diff:", diffs)
    assert np.abs(out.logits.numpy()).max() > 1.0  # not a trivially small comparison
    assert max(diffs.values()) < 1e-4, diffs


@pytest.mark.parametrize("ff,activation", [("relu", "relu"), ("gated-gelu", "geglu_tanh"),
                                           ("gelu", "gelu"), ("gelu_new", "gelu_tanh"),
                                           ("gated-silu", "swiglu")])
def test_t5_encoder_model_parity_with_transformers(tmp_path, ff, activation):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = hf_t5(transformers, torch, "v1.0", encoder_only=True, feed_forward_proj=ff)
    hf.save_pretrained(tmp_path)
    cfg, params, info = convert.from_hf(str(tmp_path))
    assert (info.model_class, info.hf_class) == ("Encoder", "T5EncoderModel")
    assert cfg.activation == activation
    src, src_mask, _, _ = batch(1)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(src, dtype=torch.long),
                  attention_mask=torch.tensor(src_mask)).last_hidden_state.numpy()
    got = info.build_model(cfg).apply({"params": params}, src, src_mask)
    diff = max_diff(got, want, src_mask.astype(bool))
    print(f"t5 encoder ({ff}) parity max abs diff:", diff)
    assert diff < 1e-4
    convert.to_hf(cfg, params, str(tmp_path / "back"))  # and the activation exports back
    assert json.loads((tmp_path / "back" / "config.json").read_text())["feed_forward_proj"] == ff


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_transformers_loads_our_export_completely(tmp_path, layout):
    """ours -> HF files -> transformers (no missing / unexpected weights) -> HF files -> ours:
    bit-identical, and transformers computes our logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = tiny_t5(layout)
    params = random_params(EncoderDecoder(cfg))
    convert.to_hf(cfg, params, str(tmp_path / "ours"))
    hf, loading = transformers.T5ForConditionalGeneration.from_pretrained(
        tmp_path / "ours", output_loading_info=True)
    assert not any(loading.get(k) for k in ("missing_keys", "unexpected_keys",
                                            "mismatched_keys")), loading
    src, src_mask, tgt, tgt_mask = batch(2)
    with torch.no_grad():
        want = hf.eval()(input_ids=torch.tensor(src, dtype=torch.long),
                         attention_mask=torch.tensor(src_mask),
                         decoder_input_ids=torch.tensor(tgt, dtype=torch.long)).logits.numpy()
    got = EncoderDecoder(cfg).apply({"params": params}, src, tgt, input_segment_ids=src_mask)
    assert max_diff(got, want, slice(None)) < 1e-4
    hf.save_pretrained(tmp_path / "theirs")
    _, back, _ = convert.from_hf(str(tmp_path / "theirs"))
    assert_trees_equal(params, back)


# ------------------------------------------------------------------ tokenizer
CORPUS = ["The quick brown fox jumps over the lazy dog.",
          "translate English to German: The house is wonderful.",
          "summarize: studies have shown that owning a dog is good for you",
          "It's 2026, isn't it? Numbers 3.14 and 42% (approx.)"]
TEXTS = [*CORPUS, "The lazy fox.", "  many   spaces  here ", "unseen Ω chars ü", "42"]


def train_spm(directory) -> None:
    """A small sentencepiece model with T5's id layout (<pad> 0, </s> 1, <unk> 2, no <s>)."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_prefix=os.path.join(directory, "spiece"),
        vocab_size=120, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", hard_vocab_limit=False,
        num_threads=1, minloglevel=2)
    (directory / "spiece.vocab").unlink()


def test_t5_tokenizer_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    train_spm(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 100}))
    ours = convert.load_hf_tokenizer(str(tmp_path))
    theirs = transformers.T5Tokenizer.from_pretrained(str(tmp_path), extra_ids=100)
    assert isinstance(ours, SentencePieceTokenizer) and ours.vocab_size == len(theirs)
    eos = ours.special_id("</s>")
    assert eos == theirs.eos_token_id == 1 and ours.pad_id == theirs.pad_token_id == 0
    for text in TEXTS:  # T5Tokenizer appends </s>
        assert ours.encode(text) + [eos] == theirs(text)["input_ids"], text
    sentinels = [f"<extra_id_{i}>" for i in range(100)]
    want = theirs.convert_tokens_to_ids(sentinels)
    assert [ours.special_id(s) for s in sentinels] == want
    assert want[0] == ours.vocab_size - 1 and want == list(range(ours.vocab_size - 1,
                                                                 ours.vocab_size - 101, -1))
    # Raw text never yields a special id; decode drops sentinels like every special id.
    assert want[0] not in ours.encode("a <extra_id_0> b")
    assert ours.decode([*ours.encode("The lazy fox."), want[0], eos]) == theirs.decode(
        theirs("The lazy fox.")["input_ids"], skip_special_tokens=True)
    ours.save(str(tmp_path / "saved"))
    again = load_tokenizer(str(tmp_path / "saved"))
    assert again.vocab_size == ours.vocab_size and again.special_id("<extra_id_99>") == want[99]


def test_t5_extra_ids_default_and_plain_sentencepiece_unchanged(tmp_path):
    train_spm(tmp_path)
    # No tokenizer_config.json: a T5 model directory gets transformers' default of 100.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    tok = convert.load_hf_tokenizer(str(tmp_path))
    pieces = SentencePieceTokenizer.from_model_file(str(tmp_path / "spiece.model"))
    assert tok.vocab_size == pieces.vocab_size + 100 and pieces.extra_ids == 0
    assert pieces.special_id("<extra_id_0>") is None
    pieces.save(str(tmp_path / "plain"))  # manifests without extra ids keep their old form
    assert "extra_ids" not in json.loads((tmp_path / "plain" / "tokenizer.json").read_text())


def test_cli_to_hf_exports_a_t5_run_with_its_tokenizer(tmp_path, capsys):
    """HF T5 dir -> from-hf (params + tokenizer) -> a run of ours (orbax state) -> to-hf:
    the same parameters, and spiece.model + tokenizer_config.json that transformers reads
    into the same ids, sentinels included."""
    import dataclasses

    import optax

    from lm import checkpoint, reporting, train

    cfg = tiny_t5("v1.0")
    params = random_params(EncoderDecoder(cfg))
    convert.to_hf(cfg, params, str(tmp_path / "hf"))
    train_spm(tmp_path / "hf")
    assert cli.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "dst")]) == 0
    run = tmp_path / "run"
    state = train.TrainState(step=np.int32(1), params=params,
                             opt_state=optax.sgd(1e-3).init(params),
                             rng=jax.random.key_data(jax.random.key(0)))
    with checkpoint.Checkpointer(run, max_to_keep=1, save_every=1, async_save=False) as ckpt:
        ckpt.save(1, state, None, force=True)
    reporting.write_config(run, {"model": {**dataclasses.asdict(cfg), "preset": "t5_small"}})
    load_tokenizer(str(tmp_path / "dst" / "tokenizer")).save(str(run / "tokenizer"))
    capsys.readouterr()
    assert cli.main(["to-hf", f"--workdir={run}", f"--out={tmp_path / 'out'}"]) == 0
    out = capsys.readouterr().out
    assert "as T5ForConditionalGeneration + spiece.model (100 extra ids)" in out, out
    got_cfg, back, _ = convert.from_hf(str(tmp_path / "out"))
    assert got_cfg == cfg
    assert_trees_equal(params, back)
    ours = convert.load_hf_tokenizer(str(tmp_path / "out"))
    assert ours.extra_ids == 100
    transformers = pytest.importorskip("transformers")
    theirs = transformers.T5Tokenizer.from_pretrained(str(tmp_path / "out"))
    for text in TEXTS:
        assert ours.encode(text) + [ours.special_id("</s>")] == theirs(text)["input_ids"], text
    assert theirs.convert_tokens_to_ids("<extra_id_0>") == ours.vocab_size - 1
