"""Causal LM on Python source: the standard library of the interpreter that runs it.

Needs no download and no path: `sysconfig` finds the stdlib; its `.py` files (sorted,
third-party site-packages left out, test folders left out unless `data.stdlib_tests=True`)
are one document each, split into train / validation by a hash of the file's path
(`lm.data.sources.load_python_stdlib`). A byte-level BPE vocabulary is trained on the train
files into the run directory.

  default  4 layers, width 128, seq 128, batch 16, BPE 2048, 1200 steps: a few minutes
           on a 2-core CPU
  small    6 layers, width 384, seq 256, batch 32, BPE 8192, 5000 steps (a GPU)
  runlocal (flag) a few steps of a tiny model, for tests and smoke runs

python -m lm.main --config=configs/code_lm.py --workdir=runs/code
python -m lm.sample --workdir=runs/code --prompt "def fibonacci(n):" --max_new_tokens=80
"""

from lm.config_base import base_config, model_config, parse_arg

VARIANTS = {
    "default": dict(layers=4, heads=4, width=128, seq=128, batch=16, vocab=2048, lr=2e-3,
                    steps=1200, warmup=100),
    "small": dict(layers=6, heads=6, width=384, seq=256, batch=32, vocab=8192, lr=1e-3,
                  steps=5000, warmup=200),
}


def get_config(arg: str | None = None):
    args = parse_arg(arg, {"variant": "default", "runlocal": False})
    v = dict(VARIANTS[args["variant"]])
    if args["runlocal"]:
        v.update(layers=2, heads=2, width=32, seq=32, batch=4, vocab=300, steps=6, warmup=2)
    c = base_config()
    c.objective = "causal_lm"
    c.model = model_config(
        "gpt2_small", vocab_size=0, num_layers=v["layers"], num_heads=v["heads"],
        d_model=v["width"], mlp_dim=4 * v["width"], max_len=v["seq"], dropout_rate=0.0,
        attention_dropout_rate=0.0, activation="gelu", use_bias=False, norm_bias=False)
    # data.path (any text file) still wins over the stdlib when given.
    c.data.python_stdlib = True
    c.data.stdlib_tests = False
    c.data.update(tokenizer="bpe", vocab_size=v["vocab"], seq_len=v["seq"], val_fraction=0.05,
                  pack="documents")
    c.optim.update(lr=v["lr"], end_lr=v["lr"] / 10, warmup_steps=v["warmup"], b2=0.99,
                   weight_decay=0.1, grad_clip=1.0)
    c.train.update(steps=v["steps"], batch_size=v["batch"], log_every=max(v["steps"] // 40, 1),
                   eval_every=max(v["steps"] // 4, 1), checkpoint_every=max(v["steps"] // 2, 1))
    # validation: 40 batches (~80k tokens) per eval keeps the evals cheap on a CPU
    c.evals.max_batches = 2 if args["runlocal"] else 40
    return c
