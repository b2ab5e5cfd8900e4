"""How does validation loss fall with width at a fixed depth and token budget?

A 4-layer GPT (configs/gpt.py:tiny's recipe) on WikiText-2 with a sentencepiece vocabulary
of 2,048, widths 32 to 256 (32-wide heads: heads = width / 32; MLP 4x width),
every run 800 steps of 16 x 128 tokens (1.6M tokens, 0.8 epoch), AdamW 1e-3 with a cosine
decay. Reported: validation loss over the whole validation split at the last step, against
non-embedding parameters N = layers x (4 d^2 + 2 d F) (Kaplan et al. 2020, no biases, norms
or embeddings), with a fitted power law L = a N^(-alpha).
"""

import math

from lm import plotting
from lm.experiment import Report, Stage, Study, Zip
from lm.models.config import ModelConfig

WIDTHS = [32, 64, 96, 128, 192, 256]


def non_embedding_params(resolved: dict) -> int:
    model = {**resolved["model"], "vocab_size": 1}
    return ModelConfig.from_dict(model).matmul_params_per_layer() * model["num_layers"]


def power_law(results, out_dir: str) -> str:
    rows = [row for row in results.rows if row.values]
    if len(rows) < 3:
        return "Too few finished widths for a power-law fit."
    by_setting = {r.run.setting: r.run.resolved for r in results.runs}
    n = [non_embedding_params(by_setting[row.setting]) for row in rows]
    loss = [row.mean for row in rows]
    err = [0.0 if math.isnan(row.std) else row.std for row in rows]
    a, alpha = plotting.plot_power_law(
        f"{out_dir}/plots/power_law.png", n, loss, err, xlabel="non-embedding parameters N",
        ylabel="validation loss (nats/token)", title="width scaling, 4 layers, 1.6M tokens")
    lines = ["| width | N (non-embedding) | validation loss | fit |", "|---|---|---|---|"]
    for row, params, value in zip(rows, n, loss, strict=True):
        lines.append(f"| {dict(row.setting)['width']} | {params:,} | {value:.4f} | "
                     f"{a * params ** (-alpha):.4f} |")
    return (f"Fitted power law: **L(N) = {a:.3f} · N^(-{alpha:.4f})** over {len(rows)} widths "
            f"(least squares in log-log space).\n\n" + "\n".join(lines)
            + "\n\n![power_law.png](plots/power_law.png)")


def get_study() -> Study:
    return Study(
        name="width_scaling",
        question="validation loss against non-embedding parameters at fixed depth and tokens",
        stages=[Stage(
            name="main",
            config="configs/gpt.py:tiny",
            overrides={"data.vocab_size": 2048, "train.steps": 800, "optim.warmup_steps": 40,
                       "train.eval_every": 400, "train.checkpoint_every": 400,
                       "train.log_every": 20, "evals.max_batches": 0},
            axes=[Zip({"model.d_model": WIDTHS,
                       "model.num_heads": [w // 32 for w in WIDTHS],
                       "model.mlp_dim": [4 * w for w in WIDTHS]}, name="width",
                      labels=[str(w) for w in WIDTHS])],
            seeds=[0],
        )],
        report=Report(metric="eval/loss", mode="last", goal="min"),
        analyses=[power_law],
    )
