"""The extra loss terms: crafted cases, bf16 gradients, the adversarial path under DDP and
across a resume."""
import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import main
import train_utils
from conftest import TINY_FLAGS
from dataset import signed_distance_map
from DDPM import Diffusion
from model import PatchDiscriminator, UNet2D
from utils import resume_config
from train_utils import (boundary_loss, discriminator_loss, generator_loss, hausdorff_dt_loss,
                         loss_fn, soft_dice_loss, train)


def square(top=8, left=8, size=12, side=32):
    mask = torch.zeros(1, 1, side, side)
    mask[..., top:top + size, left:left + size] = 1
    return mask


def sdm(mask):
    return torch.stack([signed_distance_map(m) for m in mask])


def test_signed_distance_map_signs_and_scale():
    d = signed_distance_map(square()[0])
    assert d[0, 14, 14] < 0 < d[0, 0, 0]
    assert d[0, 0, 0] == pytest.approx((8 ** 2 + 8 ** 2) ** 0.5 / 32)   # corner to (8, 8)
    assert torch.equal(signed_distance_map(torch.zeros(1, 4, 4)), torch.ones(1, 4, 4))


@pytest.mark.parametrize("term", ["dice", "boundary", "hausdorff"])
def test_perfect_prediction_scores_the_minimum(term):
    truth = square()
    distances = sdm(truth)
    score = {"dice": lambda p: soft_dice_loss(p, truth),
             "boundary": lambda p: boundary_loss(p, distances),
             "hausdorff": lambda p: hausdorff_dt_loss(p, truth, distances)}[term]
    perfect = score(truth).item()
    shifted_1 = score(square(left=10)).item()
    shifted_2 = score(square(left=13)).item()
    others = [shifted_1, shifted_2, score(square(size=8)).item(), score(square(size=16)).item(),
              score(torch.full_like(truth, 0.5)).item(), score(torch.zeros_like(truth)).item()]
    assert all(perfect < o for o in others), (perfect, others)
    assert shifted_1 < shifted_2        # further off costs more
    if term != "boundary":              # the boundary loss's minimum is negative by design
        assert perfect == pytest.approx(0, abs=1e-6)


def test_adversarial_losses():
    real, fake = torch.full((2, 1, 4, 4), 1.5), torch.full((2, 1, 4, 4), -1.5)
    assert discriminator_loss(real, fake, "hinge").item() == 0     # perfect separation
    assert discriminator_loss(fake, real, "hinge").item() > 0
    assert discriminator_loss(real, fake, "nonsaturating") < discriminator_loss(fake, real, "nonsaturating")
    for kind in ("hinge", "nonsaturating"):
        # the denoiser gains when the critic believes its masks
        assert (generator_loss(real, kind) < generator_loss(fake, kind)).all()


def cfg_with(**weights):
    cfg, _ = main.parse_args(TINY_FLAGS)
    for k, v in weights.items():
        setattr(cfg, k, v)
    return cfg


def test_loss_fn_parts_and_timestep_weighting():
    d = Diffusion(50, prediction="x0")
    truth = square(side=16)
    cfg = cfg_with(loss_dice=1.0, loss_boundary=1.0, loss_hausdorff=1.0, term_weighting="abar")
    wrong = torch.zeros_like(truth) - 1          # predicts an empty mask
    common = dict(diffusion=d, x_t=truth, mask=truth, image=truth, cfg=cfg,
                  distances=sdm(truth))
    total, early = loss_fn(wrong, truth * 2 - 1, t=torch.tensor([0]), **common)
    _, late = loss_fn(wrong, truth * 2 - 1, t=torch.tensor([49]), **common)
    assert set(early) == {"mse", "dice", "boundary", "hausdorff"}
    assert total.item() == pytest.approx(sum(v.item() for v in early.values()), rel=1e-6)
    # each term is weighted by abar_t: at t=0 the dice term is abar_0 times the plain loss
    assert early["dice"].item() == pytest.approx(
        d.alphas_cumprod[0].item() * soft_dice_loss(torch.zeros_like(truth), truth).item())
    for name in ("dice", "hausdorff"):
        assert late[name] < 1e-3 * early[name]   # near pure noise the terms fade out
    assert early["mse"] == late["mse"]           # the diffusion loss is not reweighted
    _, plain = loss_fn(wrong, truth * 2 - 1, t=torch.tensor([0]),
                       **{**common, "cfg": cfg_with(loss_dice=0.0)})
    assert set(plain) == {"mse"}
    # the default weighs every t by 1: the plain Dice loss near pure noise too
    _, uniform = loss_fn(wrong, truth * 2 - 1, t=torch.tensor([49]), **{**common, "cfg": cfg_with()})
    assert set(uniform) == {"mse", "dice"}
    assert uniform["dice"].item() == pytest.approx(
        soft_dice_loss(torch.zeros_like(truth), truth).item())


def test_finite_gradients_under_bf16_autocast():
    """Every term at once under bf16: finite gradients that point where fp32's do, and a
    small step against the gradient lowers the loss on this fixed batch."""
    torch.manual_seed(0)
    d = Diffusion(50, prediction="x0")
    model = UNet2D(base_channels=8, channel_mults=(1, 2), attention_resolutions=(2,))
    critic = PatchDiscriminator(in_channels=2, base_channels=8, num_layers=2)
    critic.requires_grad_(False)
    mask = square(side=16).expand(2, 1, 16, 16)
    image = torch.rand(2, 1, 16, 16)
    t = torch.tensor([3, 30])
    x_t, noise = d.noise_image(mask * 2 - 1, t)
    cfg = cfg_with(loss_dice=1.0, loss_boundary=1.0, loss_hausdorff=1.0, loss_adversarial=0.1)

    def loss_and_grad(bf16):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            output = model(torch.cat([x_t, image], 1), t)
            loss, parts = loss_fn(output.float(), d.training_target(mask * 2 - 1, noise, t),
                                  diffusion=d, x_t=x_t, t=t, mask=mask, image=image, cfg=cfg,
                                  distances=sdm(mask), discriminator=critic)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        return loss.item(), parts, grads

    loss, parts, grads = loss_and_grad(bf16=True)
    assert set(parts) == {"mse", "dice", "boundary", "hausdorff", "adversarial"}
    assert loss == pytest.approx(sum(v.item() for v in parts.values()), rel=1e-6)
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    loss32, _, grads32 = loss_and_grad(bf16=False)
    assert loss == pytest.approx(loss32, rel=1e-2)
    flat = torch.cat([g.flatten() for g in grads])
    flat32 = torch.cat([g.flatten() for g in grads32])
    assert torch.nn.functional.cosine_similarity(flat, flat32, dim=0) > 0.99
    with torch.no_grad():
        for p, g in zip((p for p in model.parameters() if p.grad is not None), grads32):
            p -= 1e-3 * g / flat32.norm()
    assert loss_and_grad(bf16=False)[0] < loss32


ADVERSARIAL = TINY_FLAGS + ["--synthetic-train", "16", "--loss-adversarial", "0.1",
                            "--loss-dice", "0.5", "--loss-boundary", "0.5"]


def _adversarial_rank(local_rank, world_size, cfg, port, result_dir):
    import main as launcher
    result = launcher.worker(local_rank, world_size, cfg, set(), port)
    # every field but the wall-clock ones, which each rank measures for itself
    record = {k: v for k, v in dataclasses.asdict(result.progress).items()
              if not k.endswith("_seconds")}
    Path(result_dir, f"rank{local_rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_adversarial_two_process_gloo_run(tmp_path):
    cfg, _ = main.parse_args(ADVERSARIAL + ["--epochs", "1", "--out", str(tmp_path / "run")])
    mp.spawn(_adversarial_rank, args=(2, cfg, main.free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 and r0["step"] == 2                      # 16 images, 4 per rank per step
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    fresh = PatchDiscriminator(in_channels=2)
    trained = state["adversary"]["net"]
    assert any(not torch.equal(trained[k], v) for k, v in fresh.state_dict().items()
               if v.is_floating_point())
    assert len(state["adversary"]["optimizer"]["state"]) > 0
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"adversarial", "critic", "dice", "boundary"} <= set(rows[0])
    losses = [r for r in rows if r["loss"]]
    assert [int(r["step"]) for r in losses] == [1, 2]
    diffusion_term = "ce" if cfg.prediction == "x0_logits" else "mse"
    for r in losses:   # the logged loss is the sum of its logged terms; the critic's is apart
        terms = sum(float(r[k]) for k in (diffusion_term, "dice", "boundary", "adversarial"))
        assert float(r["loss"]) == pytest.approx(terms, rel=1e-4), r
        assert r["critic"], r                     # a critic step with every step


@pytest.mark.slow
def test_resume_restores_discriminator(tmp_path):
    full, _ = main.parse_args(ADVERSARIAL + ["--epochs", "3", "--out", str(tmp_path / "full")])
    train(full)
    part, _ = main.parse_args(ADVERSARIAL + ["--epochs", "1", "--out", str(tmp_path / "part")])
    train(part)
    resumed, explicit = main.parse_args(ADVERSARIAL + ["--epochs", "3", "--resume", "auto",
                                                       "--out", str(tmp_path / "part")])
    resumed, checkpoint = resume_config(resumed, explicit)
    train(resumed, resume_from=checkpoint)
    logs = []
    for run in ("full", "part"):
        with open(tmp_path / run / "metrics.csv") as f:
            logs.append({r["step"]: (float(r["loss"]), float(r["critic"]))
                         for r in csv.DictReader(f) if r["loss"]})
    assert logs[0].keys() == logs[1].keys() and len(logs[0]) == 6
    for step, (loss, critic) in logs[0].items():
        assert logs[1][step][0] == pytest.approx(loss, abs=1e-6)
        assert logs[1][step][1] == pytest.approx(critic, abs=1e-6)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["adversary"]["net"]
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)["adversary"]["net"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
