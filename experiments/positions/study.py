"""Which position encoding trains the best character-level GPT on this budget?

nanoGPT's CPU "baby" run (configs/char_lm.py:baby: 4 layers, width 128, block 64, 2,000
steps) with learned absolute, sinusoidal, rotary (RoPE) and T5 relative-bias positions,
3 seeds each (seeds change the initialisation and the batch order). Sinusoids have unit
amplitude while GPT-2-initialised token embeddings have std 0.02, so a fifth arm scales the
token embeddings by sqrt(d_model) as Vaswani et al. do (`sinusoidal_scaled`). Reported:
validation loss over the whole held-out 10 % at the last step.
"""

from lm.experiment import Report, Stage, Study, Zip

ARMS = {  # label: (model.position, model.scale_embeddings)
    "learned": ("learned", False),
    "sinusoidal": ("sinusoidal", False),
    "sinusoidal_scaled": ("sinusoidal", True),
    "rope": ("rope", False),
    "relative": ("relative", False),
}


def get_study() -> Study:
    return Study(
        name="positions",
        question="learned vs sinusoidal vs RoPE vs T5-relative positions on char_lm:baby",
        stages=[Stage(
            name="main",
            config="configs/char_lm.py:baby",
            overrides={"data.path": "../shared/data/tinyshakespeare/input.txt"},
            axes=[Zip({"model.position": [p for p, _ in ARMS.values()],
                       "model.scale_embeddings": [s for _, s in ARMS.values()]},
                      name="position", labels=list(ARMS))],
            seeds=[0, 1, 2],
        )],
        report=Report(metric="eval/loss", mode="last", goal="min"),
    )
