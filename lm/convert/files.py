"""Files: Hugging Face model directories and our converted-params directory.

Parameters travel as flat `{"a/b/c": np.ndarray}` dicts (our paths joined by "/", loop
layer layout). Reading safetensors needs only `safetensors` + numpy (bf16 via ml_dtypes);
torch is imported only for a legacy `pytorch_model.bin`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

HF_CONFIG = "config.json"
HF_SAFETENSORS = "model.safetensors"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_BIN = "pytorch_model.bin"
# Our converted directory (written by `python -m lm.convert from-hf`, read by init_from).
PARAMS_FILE = "params.safetensors"
MODEL_CONFIG_FILE = "model_config.json"

Flat = dict[str, np.ndarray]


# ------------------------------------------------------------------ trees
def flatten(tree: Mapping[str, Any], prefix: str = "") -> Flat:
    """Nested dict of arrays (unboxed) -> {"a/b/c": np.ndarray} on the host."""
    out: Flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, path + "/"))
        else:
            out[path] = np.asarray(jax.device_get(value))
    return out


def unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """{"a/b/c": x} -> {"a": {"b": {"c": x}}}."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


# ------------------------------------------------------------------ Hugging Face
def is_hf_dir(path: str) -> bool:
    """A directory with config.json naming a `model_type` and some weights file."""
    cfg = os.path.join(path, HF_CONFIG)
    if not os.path.isfile(cfg):
        return False
    with open(cfg) as f:
        has_type = "model_type" in json.load(f)
    return has_type and any(os.path.isfile(os.path.join(path, n)) for n in
                            (HF_SAFETENSORS, HF_SAFETENSORS_INDEX, HF_BIN))


def read_hf_config(path: str) -> dict[str, Any]:
    file = os.path.join(path, HF_CONFIG)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no {HF_CONFIG} (not a Hugging Face model directory)")
    with open(file) as f:
        return json.load(f)


def _read_safetensors(file: str) -> Flat:
    from safetensors import safe_open

    try:
        with safe_open(file, framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 (SafetensorError is not exported as a class)
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def read_hf_weights(path: str) -> Flat:
    """HF tensor name -> array, from model.safetensors (or its sharded index) or, only when no
    safetensors exist, pytorch_model.bin through `torch.load(weights_only=True)`."""
    single = os.path.join(path, HF_SAFETENSORS)
    if os.path.isfile(single):
        return _read_safetensors(single)
    index = os.path.join(path, HF_SAFETENSORS_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        out: Flat = {}
        for shard in shards:
            out.update(_read_safetensors(os.path.join(path, shard)))
        return out
    binary = os.path.join(path, HF_BIN)
    if not os.path.isfile(binary):
        raise FileNotFoundError(f"{path}: no {HF_SAFETENSORS} or {HF_BIN}")
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{binary}: reading a .bin checkpoint needs torch "
                          "(pip install -e .[hf]); safetensors files do not") from e
    state = torch.load(binary, map_location="cpu", weights_only=True)
    return {k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
            for k, v in state.items()}


def write_hf(out_dir: str, config: Mapping[str, Any], tensors: Flat) -> None:
    """config.json + model.safetensors (with the {"format": "pt"} tag transformers expects)."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, HF_CONFIG), "w") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)
        f.write("\n")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              os.path.join(out_dir, HF_SAFETENSORS), metadata={"format": "pt"})


# ------------------------------------------------------------------ converted params
def is_converted_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, PARAMS_FILE))


def save_converted(out_dir: str, params: Flat, meta: Mapping[str, Any]) -> None:
    """DIR/params.safetensors (our flat paths) + DIR/model_config.json (`meta`)."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in params.items()},
              os.path.join(out_dir, PARAMS_FILE))
    with open(os.path.join(out_dir, MODEL_CONFIG_FILE), "w") as f:
        json.dump(dict(meta), f, indent=2, sort_keys=True)
        f.write("\n")


def load_converted(path: str) -> tuple[Flat, dict[str, Any]]:
    """(flat params, meta) of a directory written by `save_converted`."""
    meta_file = os.path.join(path, MODEL_CONFIG_FILE)
    meta: dict[str, Any] = {}
    if os.path.isfile(meta_file):
        with open(meta_file) as f:
            meta = json.load(f)
    return _read_safetensors(os.path.join(path, PARAMS_FILE)), meta
