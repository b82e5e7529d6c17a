"""The training options the defaults were chosen among: self-conditioning, min-SNR-gamma
loss weighting, logit-normal timestep density, the learning-rate schedule, and the choice
of sampling steps at the end of a run."""
import math

import pytest
import torch

import main
import train_utils
from conftest import TINY_FLAGS
from DDPM import Diffusion
from train_utils import ensemble_steps, fewest_good_steps, lr_factor, train
from utils import TrainConfig, load_checkpoint, stored_sample_steps


class Recorder(torch.nn.Module):
    """A stand-in denoiser that records what it is fed and predicts a fixed x0."""

    def __init__(self, value=0.5):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.value, self.inputs = value, []

    def forward(self, x_in, t):
        self.inputs.append(x_in.detach().clone())
        return self.scale * torch.full_like(x_in[:, :1], self.value)


def test_self_conditioning_feeds_the_previous_estimate_zeros_first():
    diffusion = Diffusion(50, prediction="x0", self_condition=True)
    model = Recorder(0.5)
    image = torch.rand(2, 1, 8, 8)
    diffusion.sample(model, image, steps=3, generator=torch.Generator().manual_seed(0))
    first, second, third = model.inputs
    assert first.shape == (2, 3, 8, 8)                  # noisy mask, previous x0, image
    assert torch.equal(first[:, 1], torch.zeros(2, 8, 8))
    assert torch.allclose(second[:, 1], torch.full((2, 8, 8), 0.5))
    assert torch.allclose(third[:, 1], torch.full((2, 8, 8), 0.5))
    assert torch.equal(first[:, 2:], image)
    plain = Recorder()
    Diffusion(50, prediction="x0").sample(plain, image, steps=2)
    assert plain.inputs[0].shape == (2, 2, 8, 8)


def test_self_conditioning_in_training_is_detached(monkeypatch):
    """On a self-conditioned step the first pass runs without gradient and its clipped x0
    is fed in; the loss's gradient comes from the second pass only."""
    cfg = TrainConfig(image_size=8, self_condition=True, prediction="x0", timesteps=50)
    diffusion = Diffusion(50, prediction="x0", self_condition=True)
    model = Recorder(3.0)                                # x0 outside [-1, 1]: gets clipped
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    state = train_utils.TrainState(
        model, model, diffusion, train_utils.EMA(model), optimizer,
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        torch.amp.GradScaler("cpu", enabled=False), None, torch.device("cpu"), None, False)
    batch = (torch.rand(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float())
    real_rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.zeros(()) if a == ((),)
                        else real_rand(*a, **k))        # the coin: always self-condition
    train_utils.train_step(state, cfg, train_utils.Progress(), batch)
    first, second = model.inputs
    assert torch.equal(first[:, 1], torch.zeros(2, 8, 8))
    assert torch.equal(second[:, 1], torch.ones(2, 8, 8))   # 3.0 clipped to 1
    assert model.scale.grad is not None and torch.isfinite(model.scale.grad)


@pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
def test_min_snr_weights_at_known_snrs(prediction):
    diffusion = Diffusion(1000, prediction=prediction, loss_weighting="min_snr",
                          min_snr_gamma=5.0)
    abar = diffusion.alphas_cumprod.double()
    snr = abar / (1 - abar)
    low = int((snr < 1).nonzero()[0])                  # a step with SNR below 1
    high = int((snr > 20).nonzero()[-1])               # and one above 20
    t = torch.tensor([low, high])
    raw = {"x0": lambda s: s.clamp(max=5.0), "eps": lambda s: s.clamp(max=5.0) / s,
           "v": lambda s: s.clamp(max=5.0) / (s + 1)}[prediction]
    norm = raw(snr).mean()                             # weights have mean 1 over all T
    clipped = snr[t].clamp(max=5.0) / norm
    assert torch.allclose(diffusion.loss_weight(t).double(), raw(snr[t]) / norm, rtol=1e-5)
    assert diffusion.loss_weights.double().mean() == pytest.approx(1.0, rel=1e-5)
    # the weight makes every prediction type's loss min(SNR, 5) x the x0 error
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    noise = torch.randn(2, 1, 4, 4)
    x_t, _ = diffusion.noise_image(x0, t, noise)
    target = diffusion.training_target(x0, noise, t)
    wrong = target + 0.1 * torch.randn_like(target)
    x0_hat, _ = diffusion.predict_x0_eps(x_t, t, wrong, clip=False)
    x0_error = (x0_hat - x0).pow(2).flatten(1).mean(1).double()
    out_error = (wrong - target).pow(2).flatten(1).mean(1).double()
    assert torch.allclose(diffusion.loss_weight(t).double() * out_error, clipped * x0_error,
                          rtol=1e-3)
    assert torch.equal(Diffusion(1000, prediction=prediction).loss_weight(t), torch.ones(2))


def test_logit_normal_timesteps_are_integers_in_range_and_favour_the_middle():
    diffusion = Diffusion(1000, timestep_sampling="logit_normal")
    t = diffusion.sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    middle = ((t >= 250) & (t < 750)).float().mean()
    assert 0.7 < middle < 0.8                          # P(|u| < logit(0.75) = 1.0986) = 0.727
    assert abs(t.float().median() - 500) < 15
    uniform = Diffusion(1000).sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert 0.47 < ((uniform >= 250) & (uniform < 750)).float().mean() < 0.53


def test_lr_schedules():
    const = TrainConfig(warmup_steps=10)
    assert lr_factor(const, 0) == pytest.approx(0.1) and lr_factor(const, 500) == 1.0
    cos = TrainConfig(warmup_steps=10, lr_schedule="cosine", max_steps=110)
    assert lr_factor(cos, 9) == 1.0 and lr_factor(cos, 10) == 1.0
    assert lr_factor(cos, 60) == pytest.approx(0.5) and lr_factor(cos, 110) == pytest.approx(0)
    with pytest.raises(ValueError, match="max-steps"):
        TrainConfig(lr_schedule="cosine")


def test_options_train_and_reload(tmp_path):
    """Each option through train(): self-conditioning changes the network's input and is
    rebuilt by load_checkpoint; the run ends by choosing its sampling steps on val."""
    cfg, _ = main.parse_args(TINY_FLAGS + ["--epochs", "1", "--self-condition",
                                           "--timestep-sampling", "logit_normal",
                                           "--loss-weighting", "min_snr",
                                           "--out", str(tmp_path / "run")])
    result = train(cfg)
    assert result.progress.sample_steps in (1, 2, 5, 10)
    dice = dict(map(tuple, result.progress.sample_steps_dice))
    scored = list(dice)       # ascending, up to the first count that fell below the best
    assert scored == [1, 2, 5, 10][:len(scored)] and len(scored) >= 2
    assert len(scored) == 4 or dice[scored[-1]] < max(dice.values()) - 1e-3
    assert result.progress.sample_steps == fewest_good_steps(dice)
    # the --eval-steps count was taken from best_iou.pt's validation, not sampled again:
    # the same as sampling its weights again with validation's seeds
    assert result.progress.best_iou_dice == [2, dice[2]]
    model, diffusion, _ = load_checkpoint(tmp_path / "run" / "best_iou.pt")
    _, _, val_loader = train_utils.build_loaders(cfg, torch.device("cpu"))
    again = train_utils.validate(model, diffusion, val_loader, cfg, torch.device("cpu"), None,
                                 steps=2, mse=False)
    assert again[2] == pytest.approx(dice[2], abs=1e-6) and math.isnan(again[0])
    state = torch.load(tmp_path / "run" / "best_iou.pt", weights_only=True)
    assert state["sample_steps"] == result.progress.sample_steps
    model, diffusion, config = load_checkpoint(tmp_path / "run" / "best_iou.pt")
    assert state["ensemble_steps"] == result.progress.ensemble_steps == ensemble_steps(
        dice, diffusion)
    assert diffusion.self_condition and config.loss_weighting == "min_snr"
    assert model.in_channels == 3
    assert diffusion.sample(model, torch.rand(2, 1, 16, 16), steps=2).shape == (2, 1, 16, 16)


def test_input_scaling_and_time_floor_are_what_the_network_sees():
    """input_scaling="abar" hands the network sqrt(abar_t) x_t; a time_floor caps t at the
    first timestep whose abar_t is below it, so every later one looks the same; without
    them (Diffusion's own defaults) the network sees x_t and t unchanged. The sampler
    calls the network through the same model_args."""
    d = Diffusion(1000, prediction="x0", shift=64, input_scaling="abar", time_floor=1e-3)
    abar, cap = d.alphas_cumprod, d.last_model_t
    assert abar[cap] < 1e-3 <= abar[cap - 1] and 0 < cap < 999
    x_t, image = torch.randn(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    t = torch.tensor([0, cap - 1, 999])
    x_in, t_in = d.model_args(x_t, t, image)
    assert torch.equal(t_in, torch.tensor([0, cap - 1, cap]))
    scale = torch.tensor([abar[0], abar[cap - 1], abar[999]]).sqrt().view(3, 1, 1, 1)
    assert torch.allclose(x_in[:, :1], x_t * scale)
    assert torch.equal(x_in[:, 1:], image)
    plain = Diffusion(1000, prediction="x0", shift=64)
    x_in, t_in = plain.model_args(x_t, t, image)
    assert torch.equal(x_in, torch.cat([x_t, image], 1)) and torch.equal(t_in, t)
    # self-conditioning: the previous estimate is not scaled, only the noisy mask
    sc = Diffusion(1000, prediction="x0", shift=64, self_condition=True, input_scaling="abar")
    prev = torch.rand(3, 1, 4, 4)
    x_in, _ = sc.model_args(x_t, t, image, prev)
    assert torch.allclose(x_in[:, :1], x_t * scale) and torch.equal(x_in[:, 1:2], prev)

    class TimeRecorder(Recorder):
        def forward(self, x_in, t):
            self.times = getattr(self, "times", []) + [t.clone()]
            return super().forward(x_in, t)
    model = TimeRecorder()
    d.sample(model, torch.rand(2, 1, 4, 4), steps=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.times[0], torch.full((2,), cap))       # T-1, seen as the floor
    assert model.inputs[0][:, :1].abs().max() < 1e-5              # sqrt(abar_999) x_T


@pytest.mark.parametrize("num_classes,representation", [(2, "onehot"), (4, "onehot"), (4, "bits")])
def test_x0_logits_is_cross_entropy_of_a_probability(num_classes, representation):
    """--prediction x0_logits: the estimate of x0 is 2 p - 1 with p a sigmoid (softmax over
    one-hot channels) of the output, and the loss is the cross-entropy of p against the
    clean mask: log 2 per pixel for zero logits on a binary mask or bits, log K over K
    one-hot channels."""
    d = Diffusion(50, prediction="x0_logits", num_classes=num_classes,
                  representation=representation)
    labels = torch.randint(0, num_classes, (3, 1, 6, 6)).float()
    x0 = d.encode(labels)
    zeros = torch.zeros_like(x0)
    k = num_classes if representation == "onehot" and num_classes > 2 else 2
    assert torch.allclose(d.logits_loss(zeros, x0), torch.full((3,), math.log(k)))
    assert d.logits_loss(40 * x0, x0).max() < 1e-6               # sure and right
    x_t, _ = d.noise_image(x0, torch.full((3,), 10))
    x0_hat, _ = d.predict_x0_eps(x_t, torch.full((3,), 10), 40 * x0)
    assert torch.allclose(x0_hat, x0, atol=1e-5)
    assert torch.equal(d.comparable_output(40 * x0), d.logits_to_x0(40 * x0))


def test_x0_logits_trains_binary(tmp_path):
    cfg, _ = main.parse_args(TINY_FLAGS + ["--epochs", "1", "--prediction", "x0_logits",
                                           "--loss-dice", "1", "--out", str(tmp_path / "run")])
    result = train(cfg)
    assert math.isfinite(result.progress.best_mse)
    model, diffusion, _ = load_checkpoint(tmp_path / "run" / "best_iou.pt")
    probs = diffusion.sample(model, torch.rand(2, 1, 16, 16), steps=2)
    assert probs.shape == (2, 1, 16, 16) and 0 <= probs.min() and probs.max() <= 1


def test_sampling_steps_fewest_within_tolerance():
    """The run's step choice: the fewest steps within 0.001 val Dice of the best, so a
    10-step sampler must beat one step by more than noise (jsrt-lungs at 256 px: 1 step
    0.9697, 10 steps 0.9699 -> 1)."""
    assert fewest_good_steps({1: 0.9697, 2: 0.9698, 5: 0.9699, 10: 0.9699, 25: 0.9699}) == 1
    assert fewest_good_steps({1: 0.95, 2: 0.9600, 5: 0.961, 10: 0.9612}) == 5
    assert fewest_good_steps({1: 0.90, 5: 0.90}) == 1                  # a tie: fewer
    assert fewest_good_steps({1: 0.90, 5: 0.95}, tolerance=0.1) == 1
    assert fewest_good_steps({1: 0.90, 5: 0.95}, tolerance=0.0) == 5


def test_ensemble_steps_spread_the_samples_when_one_step_cannot():
    """With the scaled input one DDIM step gives K equal samples: an ensemble takes the
    fewest of 2+ steps within 0.001 of the best one-sample val Dice, else the run's choice;
    without the scaling (samples differ at one step) the run's choice. evaluate.py's default
    reads the count for its K from the checkpoint (stored_sample_steps)."""
    scaled = Diffusion(prediction="x0", shift=64, input_scaling="abar", time_floor=1e-3)
    plain = Diffusion(prediction="eps", shift=64)
    close = {1: 0.9775, 2: 0.9768, 5: 0.9771, 10: 0.9760}   # jsrt-lungs 128 px, seed 0, val
    assert fewest_good_steps(close) == 1
    assert ensemble_steps(close, scaled) == 2 and ensemble_steps(close, plain) == 1
    assert ensemble_steps({1: 0.9775, 2: 0.9751, 5: 0.9766}, scaled) == 5
    assert ensemble_steps({1: 0.9775, 2: 0.9751, 5: 0.9746}, scaled) == 1   # accuracy first
    assert ensemble_steps({1: 0.95, 2: 0.96}, plain) == 2
    state = {"sample_steps": 1, "ensemble_steps": 2}
    assert stored_sample_steps(state) == 1 and stored_sample_steps(state, 5) == 2
    assert stored_sample_steps({"sample_steps": 1}, 5) == 1           # before the choice
    assert stored_sample_steps({}, 5) == stored_sample_steps({}) == 25


def test_step_choice_reuses_what_validation_measured_and_stops_once_past_the_best(monkeypatch):
    """Candidates are scored in ascending order without val_mse's pass; a count validation
    measured on the same weights is not sampled again; the scan stops after the first count
    more than 0.001 below the best, and before one the budget cannot afford."""
    table = {1: 0.90, 2: 0.95, 5: 0.9495, 10: 0.93}
    calls = []

    def fake_validate(model, diffusion, loader, cfg, device, dtype, steps=None, mse=True):
        calls.append((steps, mse))
        return math.nan, 0.0, table[steps], None
    monkeypatch.setattr(train_utils, "validate", fake_validate)
    diffusion = Diffusion(1000)
    score = lambda **kw: train_utils.score_sample_steps(   # noqa: E731
        None, diffusion, None, None, torch.device("cpu"), None, **kw)
    assert score(known={1: 0.90}) == {1: 0.90, 2: 0.95, 5: 0.9495, 10: 0.93}
    assert calls == [(2, False), (5, False), (10, False)]
    table[5] = 0.94                                     # 0.01 below the best: stop there
    calls.clear()
    assert score() == {1: 0.90, 2: 0.95, 5: 0.94} and [s for s, _ in calls] == [1, 2, 5]
    calls.clear()
    assert score(known={1: 0.90}, affordable=lambda steps: steps < 5) == {1: 0.90, 2: 0.95}
    assert [s for s, _ in calls] == [2]
    # a known count stays whatever the scan does; the first count is never refused
    calls.clear()
    assert score(known={10: 0.97}, affordable=lambda steps: False) == {1: 0.90, 10: 0.97}
    assert [s for s, _ in calls] == [1]
    # the choice over a cut scan is the full scan's whenever the Dice does not climb back
    assert fewest_good_steps({1: 0.90, 2: 0.95, 5: 0.94}) == 2
