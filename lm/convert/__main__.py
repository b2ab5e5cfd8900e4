"""Command line for weight conversion.

  python -m lm.convert from-hf SRC DST
      SRC: a Hugging Face model directory. Writes DST/params.safetensors (our parameter
      paths) + DST/model_config.json (ModelConfig fields, model class) [+ DST/tokenizer/];
      use it with --config.init_from=DST.
  python -m lm.convert to-hf --workdir=RUN --out=DIR [--step=N] [--kind=CLASS]
      Exports a checkpoint of one of our runs (latest by default) as DIR/config.json +
      DIR/model.safetensors (+ vocab.txt for WordPiece runs, spiece.model for SentencePiece
      runs exported as T5). CLASS: one of EXPORT_KINDS,
      inferred from the parameters when omitted.

Errors are one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from lm.convert import files
from lm.convert.hf import EXPORT_KINDS, from_hf, host_params, load_hf_tokenizer, to_hf


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise ValueError(f"bad arguments: {message}")


def _count(flat: dict[str, Any]) -> int:
    return sum(int(v.size) for v in flat.values())


def from_hf_command(src: str, dst: str) -> str:
    cfg, params, info = from_hf(src)
    flat = files.flatten({**params, **info.extras})
    meta = {"model": dataclasses.asdict(cfg), "model_class": info.model_class,
            "num_classes": info.num_classes, "nsp": info.nsp, "hf_class": info.hf_class,
            "extras": sorted(info.extras), "source": os.path.abspath(src)}
    files.save_converted(dst, flat, meta)
    note = ""
    try:
        load_hf_tokenizer(src).save(os.path.join(dst, "tokenizer"))
        note = " + tokenizer/"
    except FileNotFoundError:
        note = " (no tokenizer files found)"
    return (f"wrote {dst}: {info.hf_class} -> {info.model_class}, {len(flat)} tensors, "
            f"{_count(flat):,} parameters{note}")


def _token_table_rows(params: dict[str, Any]) -> int:
    emb = params.get("embedder") or params.get("encoder", {}).get("embedder", {})
    if "token" not in emb:
        raise ValueError("the checkpoint has no embedder/token/embedding parameter")
    return int(emb["token"]["embedding"].shape[0])


def _export_tokenizer(run_dir: str, out: str, kind: str) -> str:
    """vocab.txt + tokenizer_config.json for a WordPiece run; spiece.model +
    tokenizer_config.json (extra ids, special pieces) for a SentencePiece run exported as T5."""
    manifest_file = os.path.join(run_dir, "tokenizer", "tokenizer.json")
    if not os.path.isfile(manifest_file):
        return " (no tokenizer in the run)"
    with open(manifest_file) as f:
        manifest = json.load(f)
    tok_kind = manifest.get("kind")
    if tok_kind == "sentencepiece" and kind.startswith("T5"):
        return _export_t5_sentencepiece(os.path.join(run_dir, "tokenizer"), out)
    if tok_kind != "wordpiece":
        return f" (a {tok_kind!r} tokenizer has no {kind} equivalent: not exported)"
    from lm.data.wordpiece import WordPieceTokenizer

    tok = WordPieceTokenizer.load(os.path.join(run_dir, "tokenizer"))
    with open(os.path.join(out, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t in tok.tokens))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": tok.lowercase,
                   "strip_accents": tok.strip_accents}, f, indent=2)
    return " + vocab.txt"


def _export_t5_sentencepiece(directory: str, out: str) -> str:
    import shutil

    import sentencepiece as spm

    from lm.data.tokenizers import SentencePieceTokenizer

    tok = SentencePieceTokenizer.load(directory)
    with open(os.path.join(directory, tok.MODEL_FILE), "rb") as f:
        sp = spm.SentencePieceProcessor(model_proto=f.read())
    shutil.copyfile(os.path.join(directory, tok.MODEL_FILE), os.path.join(out, "spiece.model"))
    pieces = {"pad_token": sp.pad_id(), "eos_token": sp.eos_id(), "unk_token": sp.unk_id()}
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": tok.extra_ids,
              **{name: sp.id_to_piece(i) for name, i in pieces.items() if i >= 0}}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return f" + spiece.model ({tok.extra_ids} extra ids)"


def to_hf_command(workdir: str, out: str, step: int | None, kind: str | None) -> str:
    from ml_collections import ConfigDict

    from lm.config_base import to_model_config
    from lm.init_from import read_run_params

    config_file = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file} not found (not a run directory of ours)")
    with open(config_file) as f:
        config = json.load(f)
    params, step = read_run_params(workdir, step)
    params = host_params(params)
    cfg = to_model_config(ConfigDict(config["model"]), vocab_size=_token_table_rows(params))
    kind = to_hf(cfg, params, out, kind)
    note = _export_tokenizer(workdir, out, kind)
    return f"wrote {out}: step {step} of {workdir} as {kind}{note}"


def main(argv: list[str]) -> int:
    parser = _Parser(prog="python -m lm.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("from-hf", help="HF model directory -> init_from-loadable directory")
    p.add_argument("src")
    p.add_argument("dst")
    p = sub.add_parser("to-hf", help="a run of ours -> HF model directory")
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--kind", choices=EXPORT_KINDS, default=None)
    try:
        args = parser.parse_args(argv)
        if args.command == "from-hf":
            message = from_hf_command(args.src, args.dst)
        else:
            message = to_hf_command(args.workdir, args.out, args.step, args.kind)
    except (ValueError, KeyError, OSError, ImportError) as e:
        text = " ".join(str(e).split())
        print(f"error: {text}", file=sys.stderr)
        return 1
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
