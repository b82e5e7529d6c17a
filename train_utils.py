"""Training: the loss, EMA, and the AMP + EMA + IoU-early-stop loop `train()`.

`loss_fn` below is the one place to edit when adding loss terms. Everything the loop does
is driven by one `TrainConfig` (in utils.py, the checkpoint's schema); `main.py` turns its
fields into command-line flags. `train()` is at the bottom, built from the named steps
above it: set-up (`check_run`, `build_loaders`, `resolve_run_length`, `build_state`),
`restore`, `train_step`, `validate_and_save`.
"""
import copy
import csv
import dataclasses
import itertools
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from dataset import (MIN_VAL_IMAGES, WithDistanceMaps, build_datasets, make_loader, set_epoch,
                     signed_distance_map)
from DDPM import Diffusion, labels_from_probabilities, true_labels
from model import PatchDiscriminator, check_registered
from utils import (CheckpointError, Progress, build_model_and_diffusion, checkpoint_state,
                   class_overlap, data_defaults, find_resume_checkpoint, is_main, print0,
                   read_checkpoint, restore_checkpoint, run_length_defaults, save_checkpoint,
                   save_images, seed_everything, set_rng_state, unwrap)

# also importable from here, as the original README and notebooks have them
from DDPM import cosine_beta_schedule, linear_beta_schedule, shift_alphas_cumprod  # noqa: F401
from utils import TrainConfig, resume_config  # noqa: F401
from utils import rank as get_rank, world_size as get_world_size


# ------------------------------------------------------------------- the loss
def loss_fn(model_output, target, *, diffusion, x_t, t, mask, image, cfg,
            distances=None, discriminator=None):
    """The training loss. Returns (total, parts): a scalar to backpropagate and a dict of
    named, detached scalars; each part is a column of metrics.csv and shows in the bar.

    model_output: (B, M, H, W) what the UNet predicts (eps, x0, v or x0's logits, per
                  diffusion.prediction), M mask channels in diffusion space (1 if binary)
    target:       (B, M, H, W) the same quantity, true value (x0 for x0_logits)
    x_t, t:       the noisy mask the model saw and its timesteps (B,)
    mask:         (B, F, H, W) true mask in {0, 1} per foreground class: F = 1 for a binary
                  mask, K-1 for K classes; image: (B, C, H, W) the condition
    cfg:          the TrainConfig (term weights: cfg.loss_dice, ...; 0 = off)
    distances:    (B, F, H, W) signed distance to each class's true boundary (negative
                  inside, in image sides), from dataset.WithDistanceMaps; only when a term
                  needs it
    discriminator: the PatchGAN critic (frozen here) when cfg.loss_adversarial > 0

    `mask_pred` (B, F, H, W) is the predicted probability of each foreground class, so every
    term is computed class by class and averaged. A new term is two lines: compute it per
    image from `mask_pred`, weight it into `parts`.
    """
    if diffusion.prediction == "x0_logits":      # cross-entropy of the clean mask's logits
        parts = {"ce": weighted(diffusion.logits_loss(model_output, target),
                                diffusion.loss_weight(t))}
    else:
        mse = F.mse_loss(model_output.float(), target, reduction="none").flatten(1).mean(1)
        parts = {"mse": weighted(mse, diffusion.loss_weight(t))}   # 1, or min-SNR-gamma

    x0, _ = diffusion.predict_x0_eps(x_t, t, model_output, clip=False)
    # (B, F, H, W) in [0, 1]; K > 2: not normalised over classes (bounded gradients)
    mask_pred = diffusion.foreground(diffusion.probabilities(x0, normalise=False))
    # Weight each image by abar_t = SNR / (1 + SNR), in (0, 1]: near 1 at low noise, near 0
    # near pure noise, where an unconditional model's mask can only be a blur of the prior
    # and a sharp-mask term would reward guessing. Bounded, unlike the SNR itself. With a
    # large schedule shift abar_t is near 0 at almost every t, and the image alone decides
    # the mask there: --term-weighting uniform weighs every t by 1.
    if cfg.term_weighting == "uniform":
        weight = torch.ones_like(t, dtype=torch.float32)
    else:
        weight = diffusion.alphas_cumprod.to(t.device)[t]        # (B,)
    if cfg.loss_dice:
        parts["dice"] = cfg.loss_dice * weighted(soft_dice_loss(mask_pred, mask), weight)
    if cfg.loss_boundary:
        parts["boundary"] = cfg.loss_boundary * weighted(
            boundary_loss(mask_pred, distances), weight)
    if cfg.loss_hausdorff:
        parts["hausdorff"] = cfg.loss_hausdorff * weighted(
            hausdorff_dt_loss(mask_pred, mask, distances), weight)
    if cfg.loss_adversarial:
        parts["adversarial"] = cfg.loss_adversarial * weighted(
            generator_loss(discriminator(image, mask_pred), cfg.adversarial_loss), weight)

    total = sum(parts.values())
    return total, {name: value.detach() for name, value in parts.items()}


def weighted(per_image, weight):
    """Mean over the batch of per-image losses (B,) times their timestep weights (B,)."""
    return (per_image * weight).mean()


def soft_dice_loss(pred, mask, smooth=1.0):
    """1 - soft Dice per image (Milletari et al. 2016), (B, F, H, W) -> (B,): each class
    channel's, averaged over the F channels; 0 for a perfect prediction."""
    inter = (pred * mask).flatten(2).sum(2)                                   # (B, F)
    total = pred.flatten(2).sum(2) + mask.flatten(2).sum(2)
    return (1 - (2 * inter + smooth) / (total + smooth)).mean(1)


def boundary_loss(pred, signed_distance):
    """Boundary loss (Kervadec et al. 2019): the predicted mask integrated against the true
    mask's signed distance map, mean per image. Lowest when the prediction is exactly the
    truth (it collects all the negative inside and none of the positive outside)."""
    return (pred * signed_distance).flatten(1).mean(1)


def hausdorff_dt_loss(pred, mask, signed_distance, alpha=2.0):
    """Hausdorff-distance loss, distance-transform form (Karimi & Salcudean 2019, eq. 8):
    mean of (p - g)^2 * (d_g^alpha + d_p^alpha), d the distance to each mask's boundary.
    d_g comes from the data pipeline; d_p of the thresholded prediction is computed here,
    without gradient, on the CPU (scipy), once per step."""
    with torch.no_grad():   # per image, per class channel
        pred_distance = torch.stack([torch.cat([signed_distance_map(c[None] > 0.5) for c in p])
                                     for p in pred.detach().cpu()])
    pred_distance = pred_distance.to(pred.device).abs()
    weight = signed_distance.abs() ** alpha + pred_distance ** alpha
    return ((pred - mask) ** 2 * weight).flatten(1).mean(1)


def generator_loss(fake_logits, kind):
    """Adversarial term for the denoiser, per image: hinge -D(fake), or the non-saturating
    softplus(-D(fake)) (Goodfellow et al. 2014)."""
    per_patch = -fake_logits if kind == "hinge" else F.softplus(-fake_logits)
    return per_patch.float().flatten(1).mean(1)


def discriminator_loss(real_logits, fake_logits, kind):
    """The critic's loss: hinge (Lim & Ye 2017) or non-saturating cross-entropy."""
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


class RunFolderError(RuntimeError):
    """The run folder cannot take checkpoints: unwritable, or too little disk space."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def check_run_folder(out, model):
    """Before training: the run folder exists, takes a file, and its disk has room for the
    checkpoints a run keeps (last, last_prev, best_iou, best_mse and a temporary: five
    copies of model + EMA + two AdamW moments)."""
    probe = Path(out) / f".write_test_{get_rank()}"
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise RunFolderError(f"run folder {out} is not writable ({e.strerror or e}); "
                             f"choose another with --out") from None
    checkpoint_bytes = 4 * sum(p.numel() * p.element_size() for p in model.parameters())
    free = shutil.disk_usage(out).free
    if free < 5 * checkpoint_bytes:
        raise RunFolderError(f"only {free / 2**20:.0f} MiB free on the disk of {out}; a run "
                             f"keeps five checkpoints of {checkpoint_bytes / 2**20:.0f} MiB. "
                             f"Free some space or choose another --out")


# ------------------------------------------------------------------------ EMA
class EMA:
    """Exponential moving average of a model's parameters and float buffers.

    A deep copy of the model, started from its current weights, never trained directly.
    Every rank holds the same weights after each optimiser step, so every rank's EMA is the
    same too.
    """

    def __init__(self, model, decay=0.999, warmup=10):
        self.model = copy.deepcopy(unwrap(model)).requires_grad_(False).eval()
        self.decay = decay
        self.warmup = warmup
        self._pairs = None

    def decay_at(self, step):
        """The warm-up lets the average forget the random init quickly in early steps."""
        if self.warmup <= 0:
            return self.decay
        return min(self.decay, (1 + step) / (self.warmup + step))

    @torch.no_grad()
    def update(self, model, step):
        if self._pairs is None:  # state_dict tensors share storage with the live weights
            ema_state, live = self.model.state_dict(), unwrap(model).state_dict()
            is_float = {k: v.dtype.is_floating_point for k, v in live.items()}
            self._pairs = {kind: ([ema_state[k] for k in live if is_float[k] == kind],
                                  [live[k] for k in live if is_float[k] == kind])
                           for kind in (True, False)}
        floats_ema, floats = self._pairs[True]
        torch._foreach_lerp_(floats_ema, floats, 1.0 - self.decay_at(step))  # ema += (1-d)(w-ema)
        for ema_value, value in zip(*self._pairs[False]):
            ema_value.copy_(value)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)


# ------------------------------------------------------------------------ AMP
def amp_dtype(amp, device):
    """The autocast dtype: bf16 where the GPU supports it, else fp16; none on CPU unless
    asked for."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# ----------------------------------------------------------------- stopping
class StopSignal:
    """Agree on "stop now" across ranks without a host sync per step.

    Each rank posts its own verdict with an asynchronous all-reduce (MAX) on a CPU group
    and reads the result one step later, so all ranks stop at the same step.
    """

    def __init__(self, group=None):
        self.group = group
        self.distributed = get_world_size() > 1
        self.flag = torch.zeros(1)
        self.pending = None

    def poll(self, local_stop):
        """Called before every step. True once any rank has asked to stop."""
        if not self.distributed:
            return local_stop
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
            if self.flag.item() > 0:
                return True
        self.flag = torch.tensor([float(local_stop)])
        self.pending = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group,
                                       async_op=True)
        return False

    def settle(self, local_stop):
        """A blocking poll at an epoch boundary, so no verdict carries into the next epoch."""
        if not self.distributed:
            return local_stop
        if self.pending is not None:
            self.pending.wait()
            local_stop = local_stop or self.flag.item() > 0
            self.pending = None
        flag = torch.tensor([float(local_stop)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return flag.item() > 0


def all_reduce_sums(values, device):
    """Sum a list of floats over ranks (gloo on CPU, NCCL on GPU)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


# ------------------------------------------------------------------- the log
class MetricsLog:
    """metrics.csv and progress.png in the run folder, written by rank 0.

    metrics.csv: one row per `--log-every` steps (the loss and each part `loss_fn` reports,
    averaged over the steps and ranks since the last row; lr; images/s) and one per
    validation. On resume, rows after the checkpoint's step are dropped. progress.png, drawn
    again at each validation: the loss and its parts, the learning rate, and val IoU / MSE,
    against optimiser steps. Every call is made on every rank (the loss row all-reduces).
    """

    def __init__(self, out, device, resume_step=None):
        self.path, self.plot_path = Path(out) / "metrics.csv", Path(out) / "progress.png"
        self.device, self.resume_step = device, resume_step
        self.columns = self.part_names = None   # known at the first step's loss parts
        self.rows = []
        self.running, self.steps = None, 0      # summed losses since the last row
        self.restart_clock()

    def _open(self, part_names):
        self.part_names = part_names
        self.columns = ["epoch", "step", "loss", *part_names, "val_mse", "val_iou", "lr",
                        "images_per_s", "elapsed_s"]
        self.running = torch.zeros(1 + len(part_names), device=self.device)
        if not is_main():
            return
        if self.resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= self.resume_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)

    def restart_clock(self):
        """Images/s counts training only: its clock restarts after each row and at each
        epoch's start, so validation and saves are left out."""
        self.tick, self.images = time.time(), 0

    def add_step(self, loss, parts, images):
        """Accumulate one step's losses on the device: no host sync."""
        if self.columns is None:
            self._open(list(parts))
        self.running += torch.stack([loss.detach(), *(parts[k] for k in self.part_names)])
        self.steps += 1
        self.images += images

    def write_losses(self, epoch, step, lr, elapsed_s):
        """One loss row, averaged over ranks (a collective); returns (loss, images/s)."""
        if get_world_size() > 1:
            dist.all_reduce(self.running)
        means = (self.running / (self.steps * get_world_size())).tolist()
        speed = self.images * get_world_size() / (time.time() - self.tick)
        self.write(epoch=epoch, step=step, loss=means[0], lr=lr, images_per_s=speed,
                   elapsed_s=elapsed_s, **dict(zip(self.part_names, means[1:])))
        self.running.zero_()
        self.steps = 0
        self.restart_clock()
        return means[0], speed

    def write(self, **row):
        """One row (a validation's, or write_losses'); the columns come from the first step."""
        if is_main():
            row = {k: _fmt(v) for k, v in row.items()}
            self.rows.append(row)
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(row)

    def plot(self):
        """Draw progress.png from every row so far (rank 0). Best effort: a picture that
        cannot be drawn is reported and training goes on."""
        if is_main() and self.rows:
            try:
                self._draw()
            except Exception as e:  # noqa: BLE001 - a missing picture must not end a run
                print0(f"progress.png not drawn: {type(e).__name__}: {e}")

    def _draw(self):
        # matplotlib's object API: no pyplot state, no display needed; loaded on first use
        from matplotlib.figure import Figure

        def series(name):
            points = [(float(r["step"]), float(r[name])) for r in self.rows
                      if r.get(name) not in (None, "")]
            return [p[0] for p in points], [p[1] for p in points]

        fig = Figure(figsize=(7, 8))
        ax_loss, ax_lr, ax_val = fig.subplots(3, 1, sharex=True)
        for name in ["loss", *self.part_names]:
            steps, values = series(name)
            if steps:
                ax_loss.plot(steps, values, label=name, lw=1.2 if name == "loss" else 0.8)
        # symlog: log-like, but keeps the negative parts (the boundary and hinge terms)
        ax_loss.set_yscale("symlog", linthresh=1e-2)
        ax_loss.set_ylabel("training loss and parts")
        if ax_loss.lines:
            ax_loss.legend(fontsize=8)
        ax_lr.plot(*series("lr"), color="tab:gray")
        ax_lr.set(ylabel="learning rate")
        ax_val.plot(*series("val_iou"), "o-", color="tab:green", ms=3, label="val IoU")
        ax_val.set(ylabel="val IoU (EMA)", xlabel="optimiser step")
        ax_mse = ax_val.twinx()
        ax_mse.plot(*series("val_mse"), "s--", color="tab:red", ms=3, label="val MSE")
        ax_mse.set(ylabel="val MSE (EMA)", yscale="log")
        handles = [h for ax in (ax_val, ax_mse) for h in ax.get_legend_handles_labels()[0]]
        ax_val.legend(handles=handles, fontsize=8, loc="center right")
        fig.tight_layout()
        tmp = self.plot_path.with_name(self.plot_path.name + ".tmp.png")
        fig.savefig(tmp, dpi=80)
        os.replace(tmp, self.plot_path)


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


# ----------------------------------------------------------------- validation
@torch.no_grad()
def validate(ema_model, diffusion, loader, cfg, device, dtype, steps=None, mse=True):
    """EMA model on the validation set: (val_mse, val_iou, val_dice, first batch for pictures).

    val_mse: the diffusion MSE (model output against its target, unweighted) at a timestep
    and noise seeded by each image's index; val_iou and val_dice: `steps` (default
    --eval-steps) DDIM steps (eta=0) from a start noise seeded the same way, threshold 0.5,
    averaged over images (two empty masks score 1). So all are comparable across
    validations, batch sizes and process counts. mse=False skips val_mse's forward pass
    (it returns nan; the seeded draws, and so the sampled masks, are the same). With K > 2
    classes, IoU and Dice are the mean over the foreground classes of each image
    (utils.class_overlap). All are all-reduced as [sum, count], so every rank holds the
    same numbers.
    """
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # mse, iou, dice, images
    vis = None
    for index, image, mask in loader:
        image = image.to(device, non_blocking=True)
        mask = mask.to(device, non_blocking=True)
        x0 = diffusion.encode(mask)                                   # (B, M, H, W)
        gens = [torch.Generator().manual_seed(cfg.seed * 100_003 + int(i)) for i in index]
        t = torch.cat([torch.randint(0, diffusion.num_timesteps, (1,), generator=g)
                       for g in gens]).to(device)
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(device)
        start = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
        if mse:
            x_t, _ = diffusion.noise_image(x0, t, noise)
            with autocast(device, dtype):
                out = ema_model(*diffusion.model_args(x_t, t, image))
            per_image = (diffusion.comparable_output(out.float())
                         - diffusion.training_target(x0, noise, t)).pow(2).flatten(1)
        else:
            per_image = torch.full((len(index), 1), math.nan, device=device)
        with autocast(device, dtype):
            probs = diffusion.sample(ema_model, image, steps=steps or cfg.eval_steps,
                                     noise=start, generator=gens[0])  # the ancestral sampler's later draws
        labels = labels_from_probabilities(probs, diffusion.num_classes)  # (B, 1, H, W)
        dice, iou = class_overlap(labels, true_labels(mask, diffusion.num_classes),
                                  diffusion.num_classes)
        sums += torch.stack([per_image.mean(1).sum(), iou.sum(), dice.sum(),
                             torch.tensor(float(len(index)), device=device)]).double()
        if vis is None:
            if diffusion.num_classes == 2:
                vis = (image[:cfg.num_vis].cpu(), mask[:cfg.num_vis].cpu(),
                       probs[:cfg.num_vis].float().cpu())
            else:   # label maps as grey levels k / (K - 1)
                scale = 1.0 / (diffusion.num_classes - 1)
                vis = (image[:cfg.num_vis].cpu(), mask[:cfg.num_vis].cpu() * scale,
                       labels[:cfg.num_vis].float().cpu() * scale)
    if get_world_size() > 1:
        dist.all_reduce(sums)
    mse_sum, iou_sum, dice_sum, count = sums.tolist()
    count = max(count, 1)
    return mse_sum / count, iou_sum / count, dice_sum / count, vis


class IndexedDataset(torch.utils.data.Dataset):
    """Yields (index, image, mask), so validation can seed t and noise per image."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return (i, *self.dataset[i])


# ----------------------------------------------------------- the adversarial critic
class Adversary:
    """The PatchGAN critic behind the adversarial term: its own optimiser and GradScaler,
    DDP-wrapped when distributed, trained one step after each denoiser step."""

    def __init__(self, cfg, device, dtype, world):
        self.kind = cfg.adversarial_loss
        self.device, self.dtype = device, dtype
        # sees the image and the mask's F foreground channels (1 when binary)
        classes = cfg.num_classes - 1 if cfg.num_classes > 2 else 1
        self.net = PatchDiscriminator(in_channels=cfg.channels + classes).to(device)
        self.wrapped = self.net if world == 1 else torch.nn.parallel.DistributedDataParallel(
            self.net, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=cfg.disc_lr,
                                           betas=(0.5, 0.999))
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def frozen(self):
        """The critic for the denoiser's loss: gradients reach the mask, not the critic."""
        return self.net.requires_grad_(False)

    def step(self, image, real, fake):
        """One critic step on real and generated (image, mask) pairs; returns its loss."""
        self.net.requires_grad_(True)
        with autocast(self.device, self.dtype):
            # one forward over both halves: DDP wants one forward per backward
            logits = self.wrapped(torch.cat([image, image]), torch.cat([real, fake])).float()
        real_logits, fake_logits = logits.chunk(2)
        loss = discriminator_loss(real_logits, fake_logits, self.kind)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.scaler.is_enabled():  # skips a non-finite step itself
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            # decide on the gradient norm, which DDP's all-reduce makes equal on every rank
            norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), math.inf)
            if torch.isfinite(norm):
                self.optimizer.step()
        return loss.detach()

    def state_dict(self):
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state):
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])


# ------------------------------------------------------------------- training
class TrainResult(NamedTuple):
    ema_model: torch.nn.Module
    samples: Optional[torch.Tensor]     # (N, 1, H, W) EMA sample probabilities, last validation
    contours: Optional[torch.Tensor]    # (N, 1, H, W) the true masks of those images
    images: Optional[torch.Tensor]      # (N, C, H, W) the images themselves
    progress: Progress                  # where training stopped, best val IoU / MSE, why


@dataclass
class TrainState:
    """Everything a training step touches, built once by `build_state`; not saved (the
    checkpoint holds its weights and optimiser state, `Progress` the counters)."""
    raw_model: torch.nn.Module          # the plain model: optimiser, EMA and checkpoints
    model: torch.nn.Module              # what the step calls: raw_model under DDP / compile
    diffusion: Diffusion
    ema: EMA
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    adversary: Optional[Adversary]
    device: torch.device
    dtype: Optional[torch.dtype]        # autocast dtype; None = fp32
    channels_last: bool
    nonfinite_streak: int = 0           # skipped steps in a row
    end_seconds: float = 0.0            # the estimated cost of ending the run (see
                                        # validate_and_save), kept out of the budget
    pass_seconds: float = 0.0           # one forward pass over the val set, as last timed
    last_eval_step: int = -1            # the step of the last validation (and save), so a
                                        # stop right after one does not repeat it


def pick_device():
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def check_run(cfg, resume_from):
    """Before any data is read: the backbone is registered, and the run folder is either
    resumed or empty. Returns the checkpoint to continue (`resume_from`, or what
    `cfg.resume` names), or None for a fresh run."""
    check_registered(cfg.model)
    if resume_from is None:
        resume_from = find_resume_checkpoint(cfg)
    out = Path(cfg.out)
    if resume_from is None and cfg.resume != "auto" and any(
            (out / name).is_file() for name in ("last.pt", "last_prev.pt")):
        raise FileExistsError(f"{out} already holds a run (last.pt); pass --resume auto to "
                              f"continue it or --out to start a new one")
    return resume_from


def build_loaders(cfg, device):
    """(datasets, train loader, val loader) for this rank; val is sharded by index."""
    rank, world = get_rank(), get_world_size()
    if "batch_size" in cfg.auto_fields and cfg.batch_size % world:   # the rule's batch
        cfg.batch_size += world - cfg.batch_size % world              # fits every process
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is the global batch and must divide "
                         f"by the {world} processes; try {cfg.batch_size - cfg.batch_size % world or world}")
    batch_per_rank = cfg.batch_size // world
    datasets = build_datasets(
        cfg.data, image_size=cfg.image_size, channels=cfg.channels,
        val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed,
        augment=cfg.augment,
        synthetic_sizes=(cfg.synthetic_train, cfg.synthetic_val, cfg.synthetic_test),
        **dataset_options(cfg))
    if cfg.loss_boundary or cfg.loss_hausdorff:
        datasets["train"] = WithDistanceMaps(datasets["train"], cfg.num_classes)  # in workers
    workers = None if cfg.num_workers < 0 else cfg.num_workers
    train_loader = make_loader(datasets["train"], batch_per_rank, train=True,
                               distributed=world > 1, num_workers=workers, seed=cfg.seed,
                               device=device)
    val_shard = torch.utils.data.Subset(IndexedDataset(datasets["val"]),
                                        range(rank, len(datasets["val"]), world))
    val_loader = make_loader(val_shard, batch_per_rank, train=False, distributed=False,
                             num_workers=workers, seed=cfg.seed, device=device)
    dropped = getattr(datasets["train"], "dropped_empty", 0)
    if dropped:
        print0(f"left out {dropped} training slices without foreground "
               f"(--empty-slice-fraction {cfg.empty_slice_fraction:g})")
    if len(train_loader) == 0:
        raise ValueError(f"{len(datasets['train'])} training images give no full batch of "
                         f"{batch_per_rank} per process; lower --batch-size")
    return datasets, train_loader, val_loader


def dataset_options(cfg):
    """The ContourDataset keywords a config sets (folder data only)."""
    if cfg.data is None:
        return {}
    return dict(mask_values=list(cfg.mask_values) or None, mask_threshold=cfg.mask_threshold,
                mask_suffix=cfg.mask_suffix, allow_soft_masks=cfg.allow_soft_masks,
                fit=cfg.fit, num_classes=cfg.num_classes,
                class_values=list(cfg.class_values) or None,
                flips=cfg.flips_on(),
                slice_axis=cfg.slice_axis, window=tuple(cfg.window) or None,
                empty_slice_fraction=cfg.empty_slice_fraction)


def resolve_run_length(cfg, num_val):
    """Fill the validation cadence and stopping fields left at 0 (utils.run_length_defaults)
    and warn about a validation set too small to trust."""
    for key, value in run_length_defaults(cfg, num_val).items():
        if not getattr(cfg, key):
            setattr(cfg, key, value)
            cfg.auto_fields = tuple(sorted({*cfg.auto_fields, key}))
    if num_val < MIN_VAL_IMAGES:
        print0(f"warning: only {num_val} validation images, so val IoU is noisy and early "
               f"stopping and best_iou.pt rest on few cases. Add a val/ split of "
               f"{MIN_VAL_IMAGES} or more images, or hold back more of train with "
               f"--val-fraction (the rule takes up to 20%).")


def lr_factor(cfg, step):
    """The learning rate at `step` as a fraction of --lr: a linear warm-up over
    --warmup-steps, then constant, or a cosine decay to 0 at --max-steps."""
    warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    if cfg.lr_schedule == "constant" or step < cfg.warmup_steps:
        return warm
    done = min(1.0, (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1))
    return 0.5 * (1 + math.cos(math.pi * done))


def build_state(cfg, device):
    """Model, EMA, optimiser, scheduler, scaler and critic: the same init on every rank."""
    seed_everything(cfg.seed)
    raw_model, diffusion = build_model_and_diffusion(cfg.to_dict())
    check_run_folder(cfg.out, raw_model)   # every rank, so all fail together before training
    raw_model.to(device)
    diffusion.to(device)
    channels_last = cfg.channels_last and device.type == "cuda"  # slower on CPU convolutions
    if channels_last:
        raw_model.to(memory_format=torch.channels_last)
    dtype = amp_dtype(cfg.amp, device)
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = EMA(raw_model, cfg.ema_decay, cfg.ema_warmup)
    adversary = (Adversary(cfg, device, dtype, get_world_size()) if cfg.loss_adversarial
                 else None)
    return TrainState(raw_model, raw_model, diffusion, ema, optimizer, scheduler, scaler,
                      adversary, device, dtype, channels_last)


def restore(state, cfg, path):
    """Load `path` into `state`; returns (Progress, this rank's RNG state to restore once the
    loader stands where the run stopped, or None)."""
    rank, world = get_rank(), get_world_size()
    progress, rngs = restore_checkpoint(path, cfg, state.raw_model, state.ema, state.optimizer,
                                        state.scheduler, state.scaler, state.adversary)
    progress.stopped_early = progress.stopped_by_time = False
    progress.sample_steps = progress.sample_steps_dice = progress.ensemble_steps = None
    # ... chosen again at the end
    if progress.batch and len(rngs) != world:
        print0(f"resume: the run stopped inside epoch {progress.epoch + 1} with "
               f"{len(rngs)} processes, now {world}; the shards differ, so that epoch "
               f"restarts from its first batch")
        progress.batch = 0
    rng = rngs[rank] if len(rngs) == world else None
    if rng is None:
        print0(f"resume: the run had {len(rngs)} processes, now {world}; RNG streams "
               f"restart from the seed, so losses will not match step for step")
        seed_everything(cfg.seed + 1000 * progress.epoch + rank)
    print0(f"resumed from {path} at epoch {progress.epoch}"
           + (f", batch {progress.batch}" if progress.batch else "")
           + f" (step {progress.step})")
    return progress, rng


def wrap_model(model, cfg, device):
    """DDP when distributed, then torch.compile if asked: compile(DDP(m)) lets DDP overlap
    the all-reduce with the compiled backward."""
    if get_world_size() > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if cfg.compile else model


def deadline(minutes):
    """A function telling whether `minutes` of wall time, less `reserve` seconds, have passed
    since this call (never for minutes <= 0)."""
    end = time.time() + 60 * minutes
    return lambda reserve=0.0: minutes > 0 and time.time() > end - reserve


def epoch_batches(state, cfg, progress, loader, epoch, rng):
    """This epoch's batches, past those a mid-epoch resume already trained on, and with the
    RNG state the run had there (`rng`, first epoch of a resume only). Returns (iterator,
    batches already done)."""
    set_epoch(loader, epoch)
    batches = iter(loader)
    skip = progress.batch if epoch == progress.epoch else 0
    for _ in range(skip):
        next(batches)
    if rng is not None:  # after the skipped batches drew their augmentation
        set_rng_state(rng)
        if "cuda" not in rng and state.device.type == "cuda":
            torch.cuda.manual_seed(cfg.seed + 1000 * epoch + get_rank())
    return batches, skip


def train_step(state, cfg, progress, batch):
    """One optimiser step on one batch: (loss, parts), or None when the loss or gradient was
    not finite and the step was skipped."""
    s, diffusion = state, state.diffusion
    image, mask, *extra = (x.to(s.device, non_blocking=True) for x in batch)
    distances = extra[0] if extra else None                   # (B, F, H, W)
    x0 = diffusion.encode(mask)                               # (B, M, H, W) in {-1, 1}
    truth = diffusion.foreground(diffusion.one_hot(mask))     # (B, F, H, W) in {0, 1}
    t = diffusion.sample_timesteps(x0.shape[0], device=s.device)
    x_t, noise = diffusion.noise_image(x0, t)                 # fp32 schedule math
    x0_prev = None
    # self-conditioning on half the steps (Chen et al.), the coin the same on every rank, so
    # all run the extra pass through the (DDP) model together
    if diffusion.self_condition and torch.rand(
            (), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + progress.step)) < 0.5:
        with torch.no_grad(), autocast(s.device, s.dtype):
            first = s.model(*diffusion.model_args(x_t, t, image))
        x0_prev, _ = diffusion.predict_x0_eps(x_t, t, first.float())  # detached, clipped
    x_in, t_in = diffusion.model_args(x_t, t, image, x0_prev)  # (B, M [+ M] + C, H, W)
    if s.channels_last:
        x_in = x_in.contiguous(memory_format=torch.channels_last)
    with autocast(s.device, s.dtype):
        output = s.model(x_in, t_in)                          # (B, M, H, W)
    loss, parts = loss_fn(output.float(), diffusion.training_target(x0, noise, t),
                          diffusion=diffusion, x_t=x_t, t=t, mask=truth, image=image, cfg=cfg,
                          distances=distances,
                          discriminator=s.adversary.frozen() if s.adversary else None)
    s.optimizer.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    s.scaler.unscale_(s.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        s.raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    # Skip a step whose gradient is not finite. Gradients are all-reduced, so every rank
    # takes the same decision. Deciding costs the step's one host sync; under fp16 it
    # replaces scaler.step's own check (a second sync): unscale_ has recorded the overflow,
    # and scaler.update() lowers the scale from that record.
    finite = bool(torch.isfinite(grad_norm))
    if finite:
        s.optimizer.step()
    if s.scaler.is_enabled():
        s.scaler.update()
    if not finite:
        skip_nonfinite_step(s, cfg, progress)
        return None
    s.nonfinite_streak = 0
    s.scheduler.step()
    progress.step += 1
    s.ema.update(s.raw_model, progress.step)
    if s.adversary is not None:
        fake, _ = diffusion.predict_x0_eps(x_t, t, output.detach().float())
        parts["critic"] = s.adversary.step(
            image, truth, diffusion.foreground(diffusion.probabilities(fake, normalise=False)))
    return loss, parts


def skip_nonfinite_step(state, cfg, progress):
    """Count a skipped step; too many in a row end the run with a clear message."""
    progress.skipped_steps += 1
    # fp16's first overflows only calibrate the loss scale: a streak starts counting once
    # the scale has fallen below 1
    if not state.scaler.is_enabled() or state.scaler.get_scale() < 1:
        state.nonfinite_streak += 1
        print0(f"step {progress.step + 1}: non-finite loss or gradient, step skipped "
               f"({state.nonfinite_streak} in a row, {progress.skipped_steps} in all)")
    if state.nonfinite_streak >= cfg.max_nonfinite_steps:
        raise NonFiniteLossError(
            f"{state.nonfinite_streak} consecutive steps had a non-finite loss or gradient; "
            f"stopping. The last good checkpoint is {Path(cfg.out) / 'last.pt'}. Try a lower "
            f"--lr, --amp off or bf16, or check loss_fn")


def validate_and_save(state, cfg, progress, val_loader, log, epoch, run_start):
    """Validate the EMA model, fold the scores into `progress` (and decide on early
    stopping), log and plot them, then save last.pt, each best_*.pt it beat and a picture of
    samples. Returns the pictures (the first val batch). run_start: when the run would have
    started had it never stopped (this segment's start less the wall time before it)."""
    tick = time.time()
    val_mse, val_iou, val_dice, vis = validate(state.ema.model, state.diffusion, val_loader,
                                               cfg, state.device, state.dtype)
    seconds = time.time() - tick
    saves = progress.record_validation(val_iou, val_mse, cfg.min_delta, val_dice,
                                       cfg.eval_steps)
    progress.stopped_early = progress.out_of_patience(cfg)
    print0(f"step {progress.step} (epoch {epoch + 1}): val_mse {val_mse:.4f}  "
           f"val_iou {val_iou:.4f}  (best {progress.best_iou:.4f}, "
           f"{progress.step - progress.patience_step}/{cfg.patience} steps without gain)")
    log.write(epoch=epoch + 1, step=progress.step, val_mse=val_mse, val_iou=val_iou,
              lr=state.scheduler.get_last_lr()[0], elapsed_s=time.time() - run_start)
    log.plot()
    state.last_eval_step = progress.step
    now = time.time()
    progress.val_seconds += now - tick
    progress.wall_seconds = now - run_start
    save_run(state, cfg, progress, ["last.pt", *saves, f"samples_step{progress.step:07d}.png"],
             vis)
    # What the end of the run will cost, kept in reserve by the --max-minutes budget: a last
    # validation and save like this one, and the choice of sampling steps (score_sample_steps),
    # s forward passes per val image for each candidate s it samples where validation ran
    # 1 + eval_steps: every candidate but eval_steps (known) and the largest (scored only if
    # the budget still has room for it).
    state.pass_seconds = seconds / (1 + cfg.eval_steps)
    reserved = sum(s for s in sample_step_candidates(state.diffusion)[:-1] if s != cfg.eval_steps)
    state.end_seconds = (time.time() - tick) + state.pass_seconds * reserved
    return vis


# 25 is left out: over 29 finished runs (benchmarks/step_choices.py) it never beat 10 by
# more than the tolerance, and at 256 px the choice with it took 170 s of a 1208-s run
SAMPLE_STEP_CANDIDATES = (1, 2, 5, 10)
STEP_DICE_TOLERANCE = 1e-3   # val Dice gaps below this are noise on a few dozen images


def sample_step_candidates(diffusion):
    return [s for s in SAMPLE_STEP_CANDIDATES if s <= diffusion.max_ddim_steps]


def fewest_good_steps(dice, tolerance=STEP_DICE_TOLERANCE):
    """The fewest DDIM steps whose val Dice ({steps: Dice}) is within `tolerance` of the
    best: sampling costs steps x ensemble members, so 10 steps must earn their cost."""
    best = max(dice.values())
    return min(steps for steps, d in dice.items() if d >= best - tolerance)


def ensemble_steps(dice, diffusion, tolerance=STEP_DICE_TOLERANCE):
    """The DDIM steps for an ensemble of K > 1 samples, from the same val Dice ({steps:
    one-sample Dice}). With input_scaling="abar" one step gives K copies of one sample (the
    pure-noise start reaches the network as ~0), so there it is the fewest of 2 or more
    steps within `tolerance` of the best: the second step re-noises the first estimate with
    each sample's own noise, and the samples differ where the network is unsure. Where no
    such count is that close, or the samples differ at one step anyway: fewest_good_steps."""
    if diffusion.input_scaling == "abar":
        best = max(dice.values())
        spread = [steps for steps, d in dice.items() if steps > 1 and d >= best - tolerance]
        if spread:
            return min(spread)
    return fewest_good_steps(dice, tolerance)


def score_sample_steps(model, diffusion, val_loader, cfg, device, dtype, known=None,
                       affordable=None):
    """{steps: one-sample val Dice} of `model` at the candidate DDIM step counts, scored in
    ascending order. A count in `known` ({steps: Dice} the validation that saved `model`
    measured, with the same seeds) is taken from there, and kept whatever the scan does.
    The scan stops after the first count more than STEP_DICE_TOLERANCE below the best so
    far (fewest_good_steps can no longer pick a later one unless the Dice turns and climbs
    past the best by the tolerance, which no finished full scan has shown:
    benchmarks/step_choices.py), and before a count that `affordable(steps)` refuses (the
    --max-minutes budget; every rank takes the same decision; never the first count)."""
    known = {s: d for s, d in (known or {}).items() if s in sample_step_candidates(diffusion)}
    dice = {}
    for steps in sample_step_candidates(diffusion):
        if steps in known:
            dice[steps] = known[steps]
        else:
            refused = bool(dice) and affordable is not None and not affordable(steps)
            if all_reduce_sums([float(refused)], device)[0] > 0:
                break
            dice[steps] = validate(model, diffusion, val_loader, cfg, device, dtype, steps,
                                   mse=False)[2]
        if dice[steps] < max(dice.values()) - STEP_DICE_TOLERANCE:
            break
    return dict(sorted({**known, **dice}.items()))


def finish_run(state, cfg, progress, val_loader, run_start, out_of_time=lambda reserve: False):
    """The end of every run: choose the DDIM step count that gives best_iou.pt's EMA weights
    their best one-sample val Dice (the fewest within 0.001 of it: fewest_good_steps), store
    it as `sample_steps` (with the Dice of each candidate scored, and the count for an
    ensemble, `ensemble_steps`) in best_iou.pt, store the final Progress (wall time, validation
    share, why it stopped) in last.pt, and say so.
    evaluate.py samples with `sample_steps` (one sample) or `ensemble_steps` (K > 1) when
    given no --steps; the choice's cost is held in reserve by --max-minutes."""
    out = Path(cfg.out)
    if (out / "best_iou.pt").is_file():
        tick = time.time()
        model = copy.deepcopy(state.ema.model)
        failed = 0.0
        try:   # every rank reads it: a rank that cannot must not leave the others waiting
            best = read_checkpoint(out / "best_iou.pt")
            model.load_state_dict(best["ema"])
        except Exception as e:  # noqa: BLE001 - reported below, on every rank
            failed, error = 1.0, e
        if all_reduce_sums([failed], state.device)[0] > 0:
            raise RunFolderError(f"could not read {out / 'best_iou.pt'} back to choose the "
                                 f"sampling steps: {error if failed else 'on another rank'}")
        # the file's own record, not this run's memory: a resume from last_prev.pt or an
        # older checkpoint may not know the best_iou.pt on disk
        known = dict([best["best_iou_dice"]]) if best.get("best_iou_dice") else None
        dice = score_sample_steps(
            model, state.diffusion, val_loader, cfg, state.device, state.dtype, known,
            # the budget kept every candidate but the largest in reserve (validate_and_save)
            affordable=lambda steps: (steps < sample_step_candidates(state.diffusion)[-1]
                                      or not out_of_time(state.pass_seconds * steps)))
        progress.sample_steps = fewest_good_steps(dice)
        progress.ensemble_steps = ensemble_steps(dice, state.diffusion)
        progress.sample_steps_dice = [[steps, d] for steps, d in dice.items()]
        progress.val_seconds += time.time() - tick
        unscored = [s for s in sample_step_candidates(state.diffusion) if s not in dice]
        fell = [s for s, d in dice.items() if d < max(dice.values()) - STEP_DICE_TOLERANCE]
        why = (f"{fell[0]} fell more than {STEP_DICE_TOLERANCE} below the best" if fell
               else "no room in --max-minutes")
        print0("sampling steps by val Dice of best_iou.pt (one sample): "
               + ", ".join(f"{steps}: {d:.4f}" for steps, d in dice.items())
               + (f" ({', '.join(map(str, unscored))} not scored: {why})" if unscored else "")
               + f"; evaluate.py will use {progress.sample_steps} for one sample, "
               f"{progress.ensemble_steps} for an ensemble")
    progress.wall_seconds = time.time() - run_start
    failure = None
    if is_main():
        try:
            updates = {"best_iou.pt": {"sample_steps": progress.sample_steps,
                                       "sample_steps_dice": progress.sample_steps_dice,
                                       "ensemble_steps": progress.ensemble_steps},
                       "last.pt": dataclasses.asdict(progress)}
            for name, update in updates.items():
                if (out / name).is_file():
                    stored = read_checkpoint(out / name)
                    stored.update(update)
                    save_checkpoint(stored, out / name)
        except Exception as e:  # any failure: the other ranks must hear of it
            failure = e
    if all_reduce_sums([float(failure is not None)], state.device)[0] > 0:
        raise RunFolderError(f"could not write the run's end to {out}: "
                             f"{failure or 'rank 0 failed to save'}")
    print0(f"validation took {progress.val_seconds / max(progress.wall_seconds, 1e-9):.0%} of "
           f"the run's {progress.wall_seconds / 60:.1f} minutes")


def save_run(state, cfg, progress, names, vis):
    """Write the named checkpoints and pictures to the run folder (rank 0). Every rank learns
    whether rank 0 saved, instead of waiting at a barrier, and all fail together if not."""
    out = Path(cfg.out)
    checkpoint = checkpoint_state(state.raw_model, state.ema, state.optimizer, state.scheduler,
                                  state.scaler, progress, cfg, state.adversary)
    failure = None
    if is_main():
        try:
            for name in names:
                if name.endswith(".png"):
                    save_images(out / name, *vis)
                else:
                    save_checkpoint(checkpoint, out / name, keep_previous=name == "last.pt")
        except Exception as e:  # any failure: the other ranks must hear of it
            failure = e
    if all_reduce_sums([float(failure is not None)], state.device)[0] > 0:
        if failure is not None and not isinstance(failure, OSError):
            raise failure
        raise RunFolderError(f"could not write to the run folder {out}: "
                             f"{failure or 'rank 0 failed to save'}")


def train(cfg, resume_from=None, device=None):
    """Train a DDPM-v2 model as `cfg` says; the caller has set up the process group (if
    any). `resume_from`: the checkpoint to continue (see utils.resume_config); by default
    `cfg.resume` is followed. `device`: default CUDA (LOCAL_RANK) when there is one, else
    the CPU. Returns a TrainResult on every rank."""
    device = torch.device(device) if device is not None else pick_device()
    world = get_world_size()
    data_defaults(cfg)   # nnU-Net's dataset.json: classes and channels (main.py did it too)
    resume_from = check_run(cfg, resume_from)
    datasets, train_loader, val_loader = build_loaders(cfg, device)
    resolve_run_length(cfg, len(datasets["val"]))
    state = build_state(cfg, device)
    if resume_from is not None:
        progress, rng = restore(state, cfg, resume_from)
    else:
        progress, rng = Progress(), None
        seed_everything(cfg.seed + get_rank())  # per-rank streams for t, noise, augmentation
    state.model = wrap_model(state.raw_model, cfg, device)
    state.last_eval_step = progress.step
    log = MetricsLog(cfg.out, device, resume_step=progress.step if resume_from else None)
    control = dist.new_group(backend="gloo") if world > 1 and device.type == "cuda" else None
    stop = StopSignal(control)
    print0(f"training on {world} x {device.type}, {len(datasets['train'])} train / "
           f"{len(datasets['val'])} val images, {cfg.batch_size // world} per process per "
           f"step, amp={state.dtype}, run folder {cfg.out}\n"
           f"validation every {cfg.val_every} steps; early stop after {cfg.patience} steps "
           f"without gain, not before step {cfg.min_steps}"
           + (f"\nset by rule: {cfg.describe_auto()}" if cfg.auto_fields else ""))

    out_of_time = deadline(cfg.max_minutes)
    run_start = time.time() - progress.wall_seconds   # less the segments before a resume
    epochs = range(progress.epoch, cfg.epochs) if cfg.epochs else itertools.count(progress.epoch)
    vis = None
    capped = lambda: 0 < cfg.max_steps <= progress.step  # noqa: E731
    for epoch in epochs:
        state.model.train()
        batches, done = epoch_batches(state, cfg, progress, train_loader, epoch, rng)
        rng = None   # used up: only a resume's first epoch restores it
        bar = tqdm(total=len(train_loader), initial=done, disable=not is_main(), leave=False,
                   desc=f"epoch {epoch + 1}", dynamic_ncols=True)
        log.restart_clock()
        stopped, finished = False, capped()   # a resume may start at its cap
        while done < len(train_loader) and not finished:
            # before fetching, so a resume fetches the same batch; the end's choice of
            # sampling steps is kept inside the budget
            if stop.poll(out_of_time(state.end_seconds)):
                stopped = True
                break
            batch = next(batches)
            done += 1
            bar.update()
            result = train_step(state, cfg, progress, batch)
            if result is None:
                continue
            log.add_step(*result, images=batch[0].shape[0])
            if progress.step % cfg.log_every == 0:
                lr = state.scheduler.get_last_lr()[0]
                loss, speed = log.write_losses(epoch + 1, progress.step, lr,
                                               time.time() - run_start)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.1f}")
            finished = capped()
            if progress.step % cfg.val_every == 0 or finished:
                progress.set_position(epoch, done, len(train_loader))
                vis = validate_and_save(state, cfg, progress, val_loader, log, epoch, run_start)
                finished = finished or progress.stopped_early
                log.restart_clock()
        bar.close()

        stopped = stop.settle(stopped or out_of_time(state.end_seconds))  # all ranks agree
        progress.set_position(epoch, done, len(train_loader))
        progress.stopped_by_time = stopped
        if stopped or finished or epoch + 1 == cfg.epochs:
            if state.last_eval_step != progress.step:   # a last validation and save
                vis = validate_and_save(state, cfg, progress, val_loader, log, epoch, run_start)
            print0(f"stopped at step {progress.step}, epoch {epoch + 1}: "
                   + ("time budget reached" if stopped else
                      f"val IoU has not improved for {cfg.patience} steps"
                      if progress.stopped_early else "step or epoch cap reached"))
            break

    finish_run(state, cfg, progress, val_loader, run_start, out_of_time)
    images, contours, samples = vis if vis is not None else (None, None, None)
    return TrainResult(state.ema.model, samples, contours, images, progress)
