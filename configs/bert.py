"""BERT pretraining (masked LM + next-sentence prediction) on WikiText-style documents.

Sizes are Turc et al.'s (2019) compact BERTs and the paper's two models (presets bert_*):
  tiny 2x128, mini 4x256, small 4x512   from scratch on a CPU: WikiText-2, a WordPiece
                                        vocabulary of 8192 trained on it, AdamW 1e-3 / 5e-4,
                                        warmup 10 %, linear decay to 0 (short runs from
                                        scratch want more than the paper's 1e-4).
  medium 8x512, base 12x768, large 24x1024
                                        Devlin et al.'s recipe for accelerators: batch 256,
                                        lr 1e-4, 1M steps, 10k warmup, 30522-token vocabulary.
                                        Point data.path at a real corpus, or data.tokenizer_path
                                        at a BERT vocab.txt.
All: AdamW b2 0.999, eps 1e-6, weight decay 0.01 on kernels and embeddings (not on LayerNorm
or biases, as BERT), clip 1.0, dynamic masking (RoBERTa; data.dynamic_masking=False
for BERT's static masks), 15 % masked, at most 20 predictions per 128 tokens, NSP.

Options (comma-separated after the variant): seq512 (512 tokens, 80 predictions),
runlocal (a few steps of a tiny batch and vocabulary, for smoke runs and tests),
sst2 (task-adaptive pretraining, Gururangan et al. 2020: masked LM without NSP on the
SST-2 training texts of configs/finetune_sst2.py, split exactly as that run splits them
(its 872 validation sentences and their phrases never seen), 16 texts to a document, a
WordPiece vocabulary of 8,000 trained on them).

python -m lm.main --config=configs/bert.py:mini --workdir=/tmp/bert_mini
python -m lm.main --config=configs/bert.py:tiny,runlocal --workdir=/tmp/bert_smoke
"""

from lm.config_base import base_config, model_config, parse_arg

VARIANTS = {
    "tiny": dict(preset="bert_tiny", batch=64, steps=3000, lr=1e-3, vocab=8192, eval_batches=20,
                 dropout=0.0),
    "mini": dict(preset="bert_mini", batch=32, steps=450, lr=1e-3, vocab=8192, eval_batches=20,
                 dropout=0.0),
    "small": dict(preset="bert_small", batch=32, steps=2000, lr=5e-4, vocab=8192,
                  eval_batches=20, dropout=0.0),
    "medium": dict(preset="bert_medium", batch=256, steps=1_000_000, lr=1e-4, vocab=30522,
                   eval_batches=100, warmup=10_000),
    "base": dict(preset="bert_base", batch=256, steps=1_000_000, lr=1e-4, vocab=30522,
                 eval_batches=100, warmup=10_000),
    "large": dict(preset="bert_large", batch=256, steps=1_000_000, lr=1e-4, vocab=30522,
                  eval_batches=100, warmup=10_000),
}


def get_config(arg: str | None = None):
    args = parse_arg(arg, {"variant": "mini", "runlocal": False, "seq512": False, "sst2": False})
    name = args.get("size", args["variant"])
    if name not in VARIANTS:
        raise ValueError(f"config: unknown BERT variant {name!r}; known: {sorted(VARIANTS)}")
    v = dict(VARIANTS[name])
    seq, predictions = (512, 80) if args["seq512"] else (128, 20)
    if args["runlocal"]:
        v.update(batch=8, steps=4, vocab=1000, eval_batches=2)
        seq, predictions = 64, 10
    c = base_config()
    c.objective = "bert"
    c.model = model_config(v["preset"], vocab_size=0)
    if "dropout" in v:
        c.model.update(dropout_rate=v["dropout"], attention_dropout_rate=v["dropout"])
    c.data.update(
        path="../shared/data/wikitext2/train.txt", val_path="../shared/data/wikitext2/valid.txt",
        tokenizer="wordpiece", vocab_size=v["vocab"], seq_len=seq)
    # BERT's own fields (lm.data.bert_pipeline.BertDataOptions documents them).
    c.data.update(
        reader="auto",  # auto | wikitext | blank_line (documents separated by blank lines)
        mask_prob=0.15, max_predictions=predictions, whole_word=False, dynamic_masking=True,
        nsp_mode="nsp",  # nsp | sop | none
        nsp_weight=1.0, short_seq_prob=0.1, dupe_factor=1)
    if args["sst2"]:
        c.data.update(path="../shared/data/sst2/train.tsv", val_path="", reader="labelled",
                      format="tsv", text_key="sentence", label_key="label",
                      val_split="sentences", val_size=872, split_seed=0, texts_per_document=16,
                      nsp_mode="none", nsp_weight=0.0, vocab_size=min(v["vocab"], 8000))
    steps = v["steps"]
    c.optim.update(lr=v["lr"], end_lr=0.0, schedule="linear",
                   warmup_steps=v.get("warmup", max(steps // 10, 1)), b1=0.9, b2=0.999, eps=1e-6,
                   weight_decay=0.01, decay_embeddings=True, grad_clip=1.0)
    c.train.update(steps=steps, batch_size=v["batch"], log_every=max(min(steps // 40, 100), 1),
                   eval_every=max(steps // 8, 1), checkpoint_every=max(min(steps // 4, 10_000), 1))
    c.evals.max_batches = v["eval_batches"]
    return c
