"""bf16 compute (fp32 master weights, loss and softmax) follows the fp32 loss curve."""

from __future__ import annotations

from lm import train
from tests.test_train import losses, make_config


def test_bf16_training_follows_the_fp32_loss_curve(tmp_path):
    run = {"train.steps": 6, "train.log_every": 1, "train.eval_every": 6}
    train.train_and_evaluate(make_config(tmp_path, **run), str(tmp_path / "f32"))
    train.train_and_evaluate(make_config(tmp_path, **run, **{"model.dtype": "bfloat16"}),
                             str(tmp_path / "bf16"))
    f32, bf16 = losses(tmp_path / "f32"), losses(tmp_path / "bf16")
    assert sorted(bf16) == list(range(1, 7))
    for step in f32:
        assert abs(f32[step] - bf16[step]) < 0.02, (step, f32[step], bf16[step])
