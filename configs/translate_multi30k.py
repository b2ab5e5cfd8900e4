"""Multi30k English -> German translation with an encoder-decoder Transformer.

Data: ../shared/data/multi30k (train 29,000 / val 1,014 pairs; raw text, see its SOURCE.md);
a joint SentencePiece vocabulary of 8,000 trained on both sides of train. Pairs are packed
several to a row (64 tokens a side). Validation: teacher-forced loss / token accuracy at
every evaluation, and sacreBLEU / chrF / ROUGE of beam-search outputs (beam 4, length
penalty 0.6) on the validation set every `evals.decode_every` steps.

Variants:
  small  3 + 3 layers, width 256, 4 heads, MLP 1024 (T5 layout: relative positions,
         RMSNorm, pre-LN, tied output); sized for a 2-core CPU.
  base   6 + 6 layers, width 512, 8 heads, MLP 2048: for accelerators.
  t5     the shape and weights of a `configs/t5.py:small` span-corruption run, fine-tuned:
         --config.init_from=/path/to/t5_run (its tokenizer is used).
Add `runlocal` for a smoke run. `source=de,target=en` flips the direction.

python -m lm.main --config=configs/translate_multi30k.py:small --workdir=/tmp/mt
python -m lm.translate --workdir=/tmp/mt --text "A man is riding a bike."
"""

from lm.config_base import base_config, model_config, parse_arg

DATA = "../shared/data/multi30k"
VARIANTS = {
    "small": dict(layers=3, width=256, heads=4, mlp=1024, steps=1500, batch=32, lr=1e-3),
    "base": dict(layers=6, width=512, heads=8, mlp=2048, steps=20000, batch=128, lr=7e-4),
    "t5": dict(layers=3, width=256, heads=4, mlp=1024, steps=1500, batch=32, lr=5e-4),
}


def get_config(arg: str | None = None):
    args = parse_arg(arg, {"variant": "small", "runlocal": False, "source": "en",
                           "target": "de"})
    if args["variant"] not in VARIANTS:
        raise ValueError(f"variant: {args['variant']!r} is not one of {sorted(VARIANTS)}")
    v = VARIANTS[args["variant"]]
    c = base_config()
    c.objective = "seq2seq"
    c.model = model_config("t5_small", vocab_size=0, num_layers=v["layers"],
                           d_model=v["width"], num_heads=v["heads"], head_dim=v["width"] //
                           v["heads"], mlp_dim=v["mlp"], dropout_rate=0.1, max_len=64)
    c.data.update(path=f"{DATA}/train", val_path=f"{DATA}/val", tokenizer="sentencepiece",
                  vocab_size=8000)
    c.data.format = "parallel"
    c.data.source_lang = args["source"]
    c.data.target_lang = args["target"]
    c.data.source_key = "source"
    c.data.target_key = "target"
    c.data.inputs_length = 64
    c.data.targets_length = 64
    c.data.pack_pairs = True
    c.data.val_size = 1000  # used only without val_path
    c.data.split_seed = 0
    c.data.tokenizer_from_init = args["variant"] == "t5"
    c.data.extra_ids = 100 if args["variant"] == "t5" else 0  # the pretrained run's sentinels
    steps, batch = v["steps"], v["batch"]
    c.evals.decode_examples = 0  # 0 = the whole validation set
    c.evals.beam_size = 4
    c.evals.length_penalty = 0.6
    c.evals.decode_batch_size = 64
    if args["runlocal"]:
        steps, batch = 10, 8
        c.model.update(num_layers=1, d_model=32, num_heads=2, head_dim=16, mlp_dim=64)
        c.data.vocab_size = 500
        c.evals.max_batches = 2
        c.evals.decode_examples = 8
        c.evals.decode_batch_size = 8
    c.evals.decode_every = 4 * max(steps // 8, 1)  # every 4th evaluation (and the last)
    c.optim.update(lr=v["lr"], end_lr=v["lr"] / 100, schedule="cosine",
                   warmup_steps=max(steps // 20, 1), b2=0.98, weight_decay=0.01,
                   grad_clip=1.0)
    c.train.update(steps=steps, batch_size=batch, log_every=max(steps // 40, 1),
                   eval_every=max(steps // 8, 1), checkpoint_every=max(steps // 4, 1),
                   keep_checkpoints=2, label_smoothing=0.1)
    return c
