"""Which position encoding trains the best character-level GPT on this budget?

nanoGPT's CPU "baby" run (configs/char_lm.py:baby: 4 layers, width 128, block 64, 2,000
steps) with learned absolute, sinusoidal, rotary (RoPE) and T5 relative-bias positions,
3 seeds each (seeds change the initialisation and the batch order). Reported: validation
loss over the whole held-out 10 % at the last step.
"""

from lm.experiment import Grid, Report, Stage, Study


def get_study() -> Study:
    return Study(
        name="positions",
        question="learned vs sinusoidal vs RoPE vs T5-relative positions on char_lm:baby",
        stages=[Stage(
            name="main",
            config="configs/char_lm.py:baby",
            overrides={"data.path": "../shared/data/tinyshakespeare/input.txt"},
            axes=[Grid({"model.position": ["learned", "sinusoidal", "rope", "relative"]})],
            seeds=[0, 1, 2],
        )],
        report=Report(metric="eval/loss", mode="last", goal="min"),
    )
