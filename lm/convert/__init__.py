"""Weight conversion between Hugging Face checkpoints and our models.

  from_hf(path) -> (ModelConfig, params, HFInfo)    BERT (+ MLM/NSP/classifier heads), GPT-2
  to_hf(cfg, params, out_dir, kind=None) -> kind    config.json + model.safetensors
  load_hf_tokenizer(path)                           vocab.txt WordPiece / GPT-2 byte-level BPE

Command line: `python -m lm.convert from-hf SRC DST` (DST/params.safetensors +
model_config.json, loadable by `init_from`) and `python -m lm.convert to-hf --workdir=RUN
--out=DIR` (latest checkpoint of one of our runs). Neither reading safetensors nor writing
needs torch or transformers.
"""

from lm.convert.files import flatten, unflatten
from lm.convert.hf import EXPORT_KINDS, from_hf, host_params, infer_kind, load_hf_tokenizer, to_hf
from lm.convert.layout import HFInfo

__all__ = ["EXPORT_KINDS", "HFInfo", "flatten", "from_hf", "host_params", "infer_kind",
           "load_hf_tokenizer", "to_hf", "unflatten"]
