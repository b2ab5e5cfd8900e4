"""GPT-2-shaped decoders on a subword corpus (default: WikiText-2 from ../shared/data),
with a sentencepiece tokenizer trained from the training split into the run directory.

  small | medium | large | xl   GPT-2 shapes (model presets), seq 1024
  tiny                          a 4-layer, 256-wide decoder that trains on a laptop CPU
  runlocal (flag)               shrink any variant for a smoke run
                                (--config=configs/gpt.py:small,runlocal)

python -m lm.main --config=configs/gpt.py:tiny --workdir=/tmp/gpt_tiny
"""

from lm.config_base import base_config, model_config, parse_arg

VARIANTS = {
    "tiny": dict(preset="gpt2_small", layers=4, width=256, heads=4, seq=128, batch=16,
                 steps=3000, lr=1e-3),
    "small": dict(preset="gpt2_small", seq=1024, batch=512, steps=50_000, lr=6e-4),
    "medium": dict(preset="gpt2_medium", seq=1024, batch=512, steps=50_000, lr=3e-4),
    "large": dict(preset="gpt2_large", seq=1024, batch=512, steps=50_000, lr=2.5e-4),
    "xl": dict(preset="gpt2_xl", seq=1024, batch=512, steps=50_000, lr=2e-4),
}


def get_config(arg: str | None = None):
    args = parse_arg(arg, {"variant": "tiny", "runlocal": False})
    v = VARIANTS[args["variant"]]
    shape = {}
    if "layers" in v:
        shape = dict(num_layers=v["layers"], d_model=v["width"], num_heads=v["heads"],
                     mlp_dim=4 * v["width"])
    c = base_config()
    c.objective = "causal_lm"
    c.model = model_config(v["preset"], vocab_size=0, max_len=v["seq"], **shape)
    c.data.update(path="../shared/data/wikitext2/train.txt",
                  val_path="../shared/data/wikitext2/valid.txt", tokenizer="sentencepiece",
                  vocab_size=8192, seq_len=v["seq"], pack="chunk")
    c.optim.update(lr=v["lr"], end_lr=v["lr"] / 10, warmup_steps=min(2000, v["steps"] // 20),
                   b1=0.9, b2=0.95, weight_decay=0.1, grad_clip=1.0)
    c.train.update(steps=v["steps"], batch_size=v["batch"], log_every=50, eval_every=1000,
                   checkpoint_every=1000)
    c.evals.max_batches = 50
    if args["runlocal"]:
        c.model.update(num_layers=2, d_model=64, num_heads=2, mlp_dim=256, max_len=64)
        c.data.update(seq_len=64, vocab_size=512)
        c.train.update(steps=20, batch_size=4, log_every=5, eval_every=10, checkpoint_every=10)
        c.optim.warmup_steps = 2
        c.evals.max_batches = 2
    return c
