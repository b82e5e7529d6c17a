"""Settings resolved from the data: the image-size rule, the step budgets, the val split
rule; an explicit flag always wins."""
import math

import pytest
import torch

import main
from conftest import TINY_FLAGS
from dataset import held_back_count, split_indices
from train_utils import train
from utils import TrainConfig, run_length_defaults, size_defaults


@pytest.mark.parametrize("size,batch,shift,eval_steps", [
    (32, 16, 4.0, 10), (64, 16, 16.0, 1), (128, 8, 64.0, 1), (256, 4, 256.0, 1),
    (512, 4, 1024.0, 1), (16, 16, 1.0, 10)])
def test_size_rule_table(size, batch, shift, eval_steps):
    assert size_defaults(size) == {"batch_size": batch, "schedule_shift": shift}
    cfg = TrainConfig(image_size=size)
    assert (cfg.batch_size, cfg.schedule_shift, cfg.eval_steps) == (batch, shift, eval_steps)
    assert set(cfg.auto_fields) == {"batch_size", "schedule_shift", "eval_steps", "input_scaling"}


def test_an_explicit_flag_wins_over_the_rule():
    cfg, explicit = main.parse_args(["--image-size", "128", "--batch-size", "16",
                                     "--schedule-shift", "1"])
    # validation steps follow the shift actually used: 10 for the published schedule
    assert cfg.batch_size == 16 and cfg.schedule_shift == 1.0 and cfg.eval_steps == 10
    assert cfg.auto_fields == ("eval_steps", "input_scaling")
    assert TrainConfig(image_size=32, schedule_shift=16).eval_steps == 1
    # stored and read back: the resolved values, not the rule, so a later rule cannot
    # change what a checkpoint means
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_run_length_rule():
    cfg = TrainConfig(image_size=64)        # batch 16, 1 validation DDIM step
    assert run_length_defaults(cfg, num_val=20) == {"val_every": 100, "patience": 1000,
                                                    "min_steps": 1000}
    big = TrainConfig(image_size=64, eval_steps=10)
    # 7 x 2000 images x (1 + 10) passes / 16 = 9625 steps between validations: validation's
    # 2000 x 11 passes against 9625 steps x 16 images x 3 passes, 1/21 of the time
    assert run_length_defaults(big, num_val=2000) == {"val_every": 9625, "patience": 96250,
                                                      "min_steps": 1000}
    fixed = TrainConfig(val_every=50, patience=300, min_steps=7)
    assert run_length_defaults(fixed, num_val=20) == {"val_every": 50, "patience": 300,
                                                      "min_steps": 7}


@pytest.mark.parametrize("n,count", [(5, 1), (24, 5), (50, 10), (100, 20), (198, 20),
                                     (213, 21), (1000, 100)])
def test_val_split_rule(n, count):
    assert held_back_count(-1, n) == count
    assert held_back_count(0.1, n) == max(1, round(0.1 * n))


def test_a_larger_val_split_never_moves_the_test_split():
    test_a, val_a, _ = split_indices(100, [0.1, 0.1], seed=3)
    test_b, val_b, _ = split_indices(100, [0.1, -1], seed=3)
    assert test_a == test_b and len(val_b) == 20 and set(val_a) < set(val_b)


def test_old_configs_keep_their_meaning():
    """A checkpoint's config from before these rules: its shift was 1 (the published
    schedule) and its patience counted validations, which now means the step rule."""
    old = TrainConfig(image_size=128).to_dict()
    for key in ("schedule_shift", "val_every", "min_steps", "max_steps", "auto_fields",
                "input_scaling", "time_floor", "term_weighting"):
        del old[key]
    old.update(eval_every=1, save_every=1, patience=10, batch_size=16, eval_steps=10)
    cfg = TrainConfig.from_dict(old)
    assert cfg.schedule_shift == 1.0 and cfg.patience == 0 and cfg.batch_size == 16
    # before the network's view of x_t and t was scaled and floored: plain x_t and t
    assert (cfg.input_scaling, cfg.time_floor) == ("none", 0.0)
    assert (TrainConfig().input_scaling, TrainConfig().time_floor) == ("abar", 1e-3)
    # before --term-weighting the extra terms were weighted by abar_t, as the flag's "abar"
    assert cfg.term_weighting == "abar" and TrainConfig().term_weighting == "uniform"


def test_default_objective_is_the_unet_baselines():
    """The defaults train what bench_quality's U-Net trains: cross-entropy on the clean
    mask's logits plus soft Dice, the Dice at every timestep; each flag still wins."""
    cfg = TrainConfig()
    assert (cfg.prediction, cfg.loss_dice, cfg.term_weighting) == ("x0_logits", 1.0, "uniform")
    cfg = TrainConfig(prediction="x0", loss_dice=0.0, term_weighting="abar")
    assert (cfg.prediction, cfg.loss_dice, cfg.term_weighting) == ("x0", 0.0, "abar")


def test_input_scaling_by_prediction_type():
    """The rule: the scaled x_t for x0, x0_logits and v; eps is read off x_t, so it keeps
    x_t (asking for the scaled one with eps is refused); an explicit flag wins otherwise."""
    from DDPM import Diffusion
    for prediction, scaling in (("x0", "abar"), ("x0_logits", "abar"), ("v", "abar"),
                                ("eps", "none")):
        cfg = TrainConfig(prediction=prediction)
        assert cfg.input_scaling == scaling and "input_scaling" in cfg.auto_fields
        assert "input-scaling " + scaling in cfg.describe_auto()
    assert TrainConfig(input_scaling="none").input_scaling == "none"
    with pytest.raises(ValueError, match="eps"):
        Diffusion(100, prediction="eps", input_scaling="abar")


def test_validation_mid_epoch_and_resume_from_it(tmp_path):
    """Validation every 3 steps lands inside epochs (4 steps each); a run stopped by
    --max-steps at step 6 (epoch 2, batch 2) resumes from that save and repeats the
    uninterrupted run step for step."""
    import csv
    from utils import resume_config
    flags = TINY_FLAGS + ["--val-every", "3", "--epochs", "3"]
    full, _ = main.parse_args(flags + ["--out", str(tmp_path / "full")])
    train(full)
    part, _ = main.parse_args(flags + ["--max-steps", "6", "--out", str(tmp_path / "part")])
    result = train(part)
    assert (result.progress.step, result.progress.epoch, result.progress.batch) == (6, 1, 2)
    cfg, checkpoint = resume_config(*main.parse_args(
        flags + ["--max-steps", "0", "--resume", "auto", "--out", str(tmp_path / "part")]))
    assert cfg.max_steps == 0
    train(cfg, resume_from=checkpoint)

    def losses(run):
        with open(run / "metrics.csv") as f:
            return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["loss"]}

    def validations(run):
        with open(run / "metrics.csv") as f:
            return [int(r["step"]) for r in csv.DictReader(f) if r["val_iou"]]

    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert all(math.isclose(a[s], b[s], abs_tol=1e-6) for s in a)
    assert validations(tmp_path / "full") == validations(tmp_path / "part") == [3, 6, 9, 12]
    wa = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["ema"]
    wb = torch.load(tmp_path / "part" / "last.pt", weights_only=True)["ema"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
