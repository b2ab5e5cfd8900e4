"""Does pretraining pay off downstream? SST-2 accuracy after one fine-tuning budget.

Five starting points for the same bert_mini-shaped fine-tuning on SST-2 (configs/
finetune_sst2.py: 872 whole validation sentences, their phrases kept out of training):
  random   no pretraining, a WordPiece vocabulary of 8,000 trained on the task's texts
  mlm      masked LM on WikiText-2 (no NSP), its own WordPiece vocabulary
  mlm_nsp  masked LM + next-sentence prediction on WikiText-2 (BERT's recipe)
  tapt     task-adaptive MLM (Gururangan et al. 2020) on SST-2's own training texts,
           the vocabulary trained on them (configs/bert.py:mini,sst2)
  minilm   the packaged all-MiniLM-L6-v2 (6 x 384, pretrained far beyond this machine)
Pretraining: 600 steps of 32 x 128 tokens per arm (about 8 CPU-minutes here). Fine-tuning:
300 steps of 32, AdamW 3e-4 with 10 % warmup and linear decay (MiniLM: 5e-5, its
config's rate), 2 seeds per arm; pretrained arms fine-tune from each of their pretraining
runs (`init_from`).
"""

from lm.experiment import Report, Stage, Study, Zip

PRETRAIN_STEPS = 600
FINETUNE = {"train.steps": 300, "optim.warmup_steps": 30, "train.eval_every": 75,
            "train.checkpoint_every": 150, "train.log_every": 10}


def get_study() -> Study:
    pretrain = Stage(
        name="pretrain",
        config="configs/bert.py:mini",
        overrides={"train.steps": PRETRAIN_STEPS, "optim.warmup_steps": PRETRAIN_STEPS // 10,
                   "train.eval_every": PRETRAIN_STEPS // 3,
                   "train.checkpoint_every": PRETRAIN_STEPS // 3},
        axes=[Zip({"config": ["configs/bert.py:mini", "configs/bert.py:mini",
                              "configs/bert.py:mini,sst2"],
                   "data.nsp_mode": ["none", "nsp", "none"],
                   "data.nsp_weight": [0.0, 1.0, 0.0]},
                  name="arm", labels=["mlm", "mlm_nsp", "tapt"])],
        seeds=[0],
    )
    finetune = Stage(
        name="finetune",
        config="configs/finetune_sst2.py:ours",
        overrides={**FINETUNE, "optim.lr": 3e-4},
        seeds=[0, 1],
        init_from="pretrain",
    )
    baselines = Stage(
        name="baselines",
        config="configs/finetune_sst2.py:random",
        overrides=FINETUNE,
        axes=[Zip({"config": ["configs/finetune_sst2.py:random"]}, name="arm",
                  labels=["random"])],
        seeds=[0, 1],
    )
    reference = Stage(  # the packaged pretrained model: last, it is the costliest to tune
        name="reference",
        config="configs/finetune_sst2.py:minilm",
        overrides=FINETUNE,
        axes=[Zip({"config": ["configs/finetune_sst2.py:minilm"]}, name="arm",
                  labels=["minilm"])],
        seeds=[0, 1],
    )
    return Study(
        name="pretraining_value",
        question="does pretraining within this machine's budget beat random init on SST-2?",
        stages=[baselines, pretrain, finetune, reference],
        report=Report(metric="eval/accuracy", mode="last", goal="max",
                      stages=("baselines", "finetune", "reference")),
    )
