"""T5 pretraining by span corruption (noise density 0.15, mean span 3, sentinels from the top
of the vocabulary), then fine-tuning the run with `init_from`.

Variants:
  small     CPU-sized: WikiText-2 (../shared/data/wikitext2), the shape of
            `translate_multi30k.py:t5` (3 + 3 layers, width 256), 128 inputs (141 raw tokens
            -> 29 targets), a SentencePiece vocabulary of 8,000 trained on WikiText-2 plus
            Multi30k's English and German (the later fine-tuning languages, as T5's
            vocabulary covers its tasks' languages) and 100 sentinel ids above it.
  t5_small  the T5-small preset (60M), 512 inputs (568 raw -> 114 targets), C4 from the tfds
  t5_base   catalogue (`c4/en`; prepare it with tfds first) and a 32,000 SentencePiece
            vocabulary: for accelerators.
Options: `arch=prefix_lm` trains a decoder-only model on the same examples (inputs a
bidirectional prefix, loss on the targets); `runlocal` for a smoke run.

python -m lm.main --config=configs/t5.py:small --workdir=/tmp/t5
python -m lm.main --config=configs/translate_multi30k.py:t5 --workdir=/tmp/mt_t5 \\
    --config.init_from=/tmp/t5
"""

from lm.config_base import base_config, model_config, parse_arg

WIKITEXT = "../shared/data/wikitext2"
MULTI30K = "../shared/data/multi30k"
VARIANTS = {
    "small": dict(preset="t5_small", layers=3, width=256, heads=4, mlp=1024, inputs=128,
                  steps=2000, batch=32, lr=1e-3, vocab=8000),
    "t5_small": dict(preset="t5_small", inputs=512, steps=524288, batch=128, lr=1e-3,
                     vocab=32000),
    "t5_base": dict(preset="t5_base", inputs=512, steps=524288, batch=128, lr=1e-3,
                    vocab=32000),
}


def get_config(arg: str | None = None):
    args = parse_arg(arg, {"variant": "small", "runlocal": False, "arch": "encoder_decoder"})
    if args["variant"] not in VARIANTS:
        raise ValueError(f"variant: {args['variant']!r} is not one of {sorted(VARIANTS)}")
    if args["arch"] not in ("encoder_decoder", "prefix_lm"):
        raise ValueError(f"arch: {args['arch']!r} is not 'encoder_decoder' or 'prefix_lm'")
    v = VARIANTS[args["variant"]]
    c = base_config()
    c.objective = "span_corruption" if args["arch"] == "encoder_decoder" else "prefix_lm"
    shape = {}
    if "layers" in v:
        shape = dict(num_layers=v["layers"], d_model=v["width"], num_heads=v["heads"],
                     head_dim=v["width"] // v["heads"], mlp_dim=v["mlp"])
    if args["arch"] == "prefix_lm":  # one stack of twice the depth: about the same size
        shape["num_layers"] = 2 * shape.get("num_layers", 6 if v["preset"] == "t5_small"
                                            else 12)
    c.model = model_config(v["preset"], vocab_size=0, dropout_rate=0.0, **shape)
    if args["variant"] == "small":
        c.data.update(path=f"{WIKITEXT}/train.txt", val_path=f"{WIKITEXT}/valid.txt")
        c.data.tokenizer_extra_corpus = f"{MULTI30K}/train.en.gz,{MULTI30K}/train.de.gz"
    else:
        c.data.update(tfds_name="c4/en", text_key="text")
        c.data.tokenizer_extra_corpus = ""
    c.data.update(tokenizer="sentencepiece", vocab_size=v["vocab"], pack="chunk")
    c.data.inputs_length = v["inputs"]
    c.data.noise_density = 0.15
    c.data.mean_span_length = 3.0
    c.data.extra_ids = 100
    c.data.eval_max_batches = 0
    steps, batch = v["steps"], v["batch"]
    if args["runlocal"]:
        steps, batch = 6, 4
        c.model.update(num_layers=1, d_model=32, num_heads=2, head_dim=16, mlp_dim=64)
        c.data.vocab_size = 400
        c.data.inputs_length = 32
        c.data.tokenizer_extra_corpus = ""
        c.evals.max_batches = 2
    # T5 used Adafactor at 1e-2 with inverse-sqrt decay; here the loop's AdamW, 1e-3, a
    # short warmup and cosine decay.
    c.optim.update(lr=v["lr"], end_lr=1e-5, warmup_steps=max(steps // 20, 1), b2=0.98,
                   weight_decay=0.01)
    c.train.update(steps=steps, batch_size=batch, log_every=max(steps // 40, 1),
                   eval_every=max(steps // 4, 1), checkpoint_every=max(steps // 4, 1),
                   keep_checkpoints=2)
    return c
