"""Character-level GPT on a local text file (default: tiny shakespeare).

  baby   nanoGPT's documented CPU run: 4 layers, 4 heads, width 128, block 64, batch 12,
         dropout 0, AdamW 1e-3 -> 1e-4 cosine, warmup 100, betas (0.9, 0.99), wd 0.1,
         clip 1.0, 2000 steps (nanoGPT reports val loss 1.88).
  small  nanoGPT's shakespeare-char GPU config: 6 layers, 6 heads, 384, block 256,
         batch 64, dropout 0.2, lr 1e-3, 5000 steps (nanoGPT reports 1.4697 on an A100).
  test   a few steps of a tiny model, for tests and smoke runs.

python -m lm.main --config=configs/char_lm.py:baby --workdir=/tmp/baby   # downloads once
python -m lm.main --config=configs/char_lm.py:baby --workdir=/tmp/baby \
    --config.data.path=../shared/data/tinyshakespeare/input.txt               # offline
"""

from lm.config_base import base_config, model_config, parse_arg

VARIANTS = {
    "baby": dict(layers=4, heads=4, width=128, seq=64, batch=12, dropout=0.0, lr=1e-3,
                 steps=2000, warmup=100),
    "small": dict(layers=6, heads=6, width=384, seq=256, batch=64, dropout=0.2, lr=1e-3,
                  steps=5000, warmup=100),
    "test": dict(layers=2, heads=2, width=32, seq=16, batch=8, dropout=0.0, lr=1e-3,
                 steps=6, warmup=2),
}


def get_config(arg: str | None = None):
    args = parse_arg(arg, {"variant": "baby"})
    v = VARIANTS[args["variant"]]
    c = base_config()
    c.objective = "causal_lm"
    c.model = model_config(
        "gpt2_small", vocab_size=0, num_layers=v["layers"], num_heads=v["heads"],
        d_model=v["width"], mlp_dim=4 * v["width"], max_len=v["seq"], dropout_rate=v["dropout"],
        attention_dropout_rate=v["dropout"], activation="gelu", use_bias=False,
        norm_bias=False)
    # Offline: --config.data.path=FILE (e.g. ../shared/data/tinyshakespeare/input.txt).
    c.data.url = ("https://raw.githubusercontent.com/karpathy/char-rnn/"
                  "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/data/tinyshakespeare/input.txt")
    c.data.sha256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    c.data.tokenizer = "char"
    c.data.seq_len = v["seq"]
    c.data.val_fraction = 0.1
    c.data.train_stride = 1  # windows at every offset, as nanoGPT samples them
    # As nanoGPT (bias=False): no biases in linear layers or LayerNorms; weight decay on
    # every 2-D weight including the embeddings.
    c.optim.update(lr=v["lr"], end_lr=v["lr"] / 10, warmup_steps=v["warmup"], b2=0.99,
                   weight_decay=0.1, grad_clip=1.0, decay_embeddings=True)
    c.train.update(steps=v["steps"], batch_size=v["batch"], log_every=max(v["steps"] // 40, 1),
                   eval_every=max(v["steps"] // 8, 1), checkpoint_every=max(v["steps"] // 4, 1))
    c.evals.max_batches = 0 if args["variant"] != "test" else 2
    if args["variant"] == "baby":
        # 10 optimizer steps per compiled call: 1.13x the step rate of one per call
        # (benchmarks/ab.py, CPU time, 3 rounds; README Performance); the validation pass,
        # forward only, in batches of 64 windows (28 calls instead of 146): 1.5-1.6 s per
        # pass against 1.9-2.0 s in batches of 256 (same losses; per window a forward
        # costs 0.80 / 0.83 / 0.95 / 1.02 ms at batch 32 / 64 / 128 / 256)
        c.train.steps_per_call = 10
        c.evals.batch_size = 64
    return c
