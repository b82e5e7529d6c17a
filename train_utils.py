"""Training: noise schedules, the loss, EMA, and the AMP + EMA + IoU-early-stop loop `train()`.

`loss_fn` below is the one place to edit when adding loss terms. Everything the loop does
is driven by one `TrainConfig`; `main.py` turns its fields into command-line flags.
"""
import copy
import csv
import dataclasses
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from utils import (CHECKPOINT_VERSION, MODEL_KEYS, CheckpointError,
                   build_model_and_diffusion, check_finite, check_model_config, is_main,
                   overlap_scores, previous_checkpoint, print0, read_checkpoint,
                   save_checkpoint, save_images, unwrap)
from utils import rank as get_rank, world_size as get_world_size


# ------------------------------------------------------------------- the loss
def loss_fn(model_output, target, *, diffusion, x_t, t, mask, image, cfg,
            distances=None, discriminator=None):
    """The training loss. Returns (total, parts): a scalar to backpropagate and a dict of
    named, detached scalars; each part is a column of metrics.csv and shows in the bar.

    model_output: (B, 1, H, W) what the UNet predicts (eps, x0 or v, per diffusion.prediction)
    target:       (B, 1, H, W) the same quantity, true value
    x_t, t:       the noisy mask the model saw and its timesteps (B,)
    mask:         (B, 1, H, W) true mask in {0, 1}; image: (B, C, H, W) the condition
    cfg:          the TrainConfig (term weights: cfg.loss_dice, ...; 0 = off)
    distances:    (B, 1, H, W) signed distance to the true boundary (negative inside, in
                  image sides), from dataset.WithDistanceMaps; only when a term needs it
    discriminator: the PatchGAN critic (frozen here) when cfg.loss_adversarial > 0

    A new term is two lines: compute it per image from `mask_pred`, weight it into `parts`.
    """
    parts = {"mse": F.mse_loss(model_output.float(), target)}

    x0, _ = diffusion.predict_x0_eps(x_t, t, model_output, clip=False)
    mask_pred = ((x0 + 1) / 2).clamp(0, 1)                        # (B, 1, H, W) in [0, 1]
    # Weight each image by abar_t = SNR / (1 + SNR), in (0, 1]: near 1 at low noise, near 0
    # near pure noise, where the predicted mask can only be a blur of the prior and a
    # sharp-mask term would reward guessing. Bounded, unlike the SNR itself.
    weight = diffusion.alphas_cumprod.to(t.device)[t]            # (B,)
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
    """1 - soft Dice per image (Milletari et al. 2016): 0 for a perfect prediction."""
    inter = (pred * mask).flatten(1).sum(1)
    total = pred.flatten(1).sum(1) + mask.flatten(1).sum(1)
    return 1 - (2 * inter + smooth) / (total + smooth)


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
    from dataset import signed_distance_map
    with torch.no_grad():
        pred_distance = torch.stack([signed_distance_map(p > 0.5) for p in pred.detach().cpu()])
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


# ------------------------------------------------------------- noise schedules
def cosine_beta_schedule(timesteps, s=0.008, max_beta=0.999, shift=1.0):
    """Improved-DDPM eq. 17: abar(t) = cos^2(((t/T) + s) / (1 + s) * pi/2), normalised so
    abar(0) = 1, and beta_t = min(1 - abar(t+1)/abar(t), max_beta). Float64, shape (T,).

    max_beta stops the last step from being a certain jump to pure noise (beta = 1).
    shift: see shift_alphas_cumprod; 1 = the schedule as published.
    """
    steps = torch.arange(timesteps + 1, dtype=torch.float64)
    f = torch.cos(((steps / timesteps) + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = shift_alphas_cumprod(f / f[0], shift)
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=max_beta)


def linear_beta_schedule(timesteps, beta_start=1e-4, beta_end=0.02, shift=1.0):
    """Ho et al.'s linear schedule, rescaled so any T gives the same overall noise as T=1000."""
    scale = 1000 / timesteps
    betas = torch.linspace(scale * beta_start, scale * beta_end, timesteps, dtype=torch.float64)
    if shift == 1:
        return betas
    alphas_cumprod = shift_alphas_cumprod(torch.cumprod(1 - betas, 0), shift)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return 1 - alphas_cumprod / prev


def shift_alphas_cumprod(alphas_cumprod, shift):
    """Lower the log signal-to-noise ratio of every step by 2 ln(shift) (Hoogeboom et al.
    2023, "simple diffusion", shifted schedules; Chen 2023, "On the importance of noise
    scheduling", input scaling): SNR' = SNR / shift^2, i.e. abar' = abar / (abar + shift^2
    (1 - abar)). The ends stay put (abar' = 1 at abar = 1 and 0 at 0).

    Why: a mask is nearly all low frequency, so at a given abar a large mask keeps far more
    of its shape than a small natural image does, and with shift 1 most training steps can
    be solved by denoising the noisy mask alone, without looking at the image. shift > 1
    spends more of them at noise levels where the image is the only guide.
    """
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"schedule shift must be a finite number > 0, got {shift}")
    if shift == 1:
        return alphas_cumprod       # as published, bit for bit (no rounding through the formula)
    return alphas_cumprod / (alphas_cumprod + shift ** 2 * (1 - alphas_cumprod))


# ----------------------------------------------------------------- the config
def _opt(default, help, **kw):
    """A config field with its --help text (and argparse choices, if any)."""
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Every knob of a run. Each field is a --kebab-case flag of main.py."""
    # data
    data: Optional[str] = _opt(None, "image/mask folder (<root>/<split>/images|masks); "
                                     "absent: the built-in synthetic contours")
    image_size: int = _opt(64, "images and masks are resized to this square size")
    channels: int = _opt(1, "image channels the model sees: 1 grey, 3 RGB")
    augment: bool = _opt(True, "flips, small affine and intensity jitter on training images")
    val_fraction: float = _opt(0.1, "fraction of train held back when the data has no val split")
    num_workers: int = _opt(-1, "data loader workers per process; -1 picks a default")
    synthetic_train: int = _opt(1000, "training images of the synthetic set")
    synthetic_val: int = _opt(100, "validation images of the synthetic set")
    synthetic_test: int = _opt(100, "test images of the synthetic set")
    # model
    base_channels: int = _opt(16, "UNet width at full resolution")
    channel_mults: tuple = _opt((1, 2, 4, 8), "width multiplier per UNet level")
    num_res_blocks: int = _opt(1, "residual blocks per UNet level")
    attention_resolutions: tuple = _opt((8,), "downsampling factors with self-attention")
    dropout: float = _opt(0.0, "dropout in residual blocks")
    # diffusion
    timesteps: int = _opt(1000, "diffusion steps T")
    schedule: str = _opt("cosine", "noise schedule", choices=("cosine", "linear"))
    schedule_shift: float = _opt(1.0, "divide the schedule's signal-to-noise ratio by "
                                      "shift^2 at every step; > 1 = noisier (large masks)")
    prediction: str = _opt("x0", "what the UNet predicts", choices=("eps", "x0", "v"))
    # optimisation
    epochs: int = _opt(100, "maximum epochs")
    batch_size: int = _opt(16, "global batch size, split across processes")
    lr: float = _opt(1e-3, "AdamW learning rate after warm-up")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    warmup_steps: int = _opt(100, "steps of linear learning-rate warm-up")
    grad_clip: float = _opt(1.0, "gradient-norm clip; 0 = off")
    ema_decay: float = _opt(0.999, "EMA decay of the weights")
    ema_warmup: int = _opt(10, "EMA decay is min(decay, (1+step)/(warmup+step)); 0 = off")
    amp: str = _opt("auto", "mixed precision: auto = bf16 (or fp16 + GradScaler) on CUDA, "
                            "off on CPU", choices=("auto", "bf16", "fp16", "off"))
    compile: bool = _opt(False, "torch.compile the model")
    channels_last: bool = _opt(True, "NHWC memory layout on CUDA")
    # evaluation and stopping
    eval_every: int = _opt(1, "epochs between validations")
    eval_steps: int = _opt(10, "DDIM steps for validation IoU")
    patience: int = _opt(10, "validations without val IoU gain before stopping")
    min_delta: float = _opt(1e-3, "smallest val IoU gain that restarts the patience count "
                                  "(best_iou.pt follows any gain)")
    max_minutes: float = _opt(-1.0, "wall-clock budget from the start of training; 0 = none; "
                                    "-1 = 8 for the synthetic demo, none with --data")
    num_vis: int = _opt(4, "validation images in each sample picture")
    # run
    seed: int = _opt(0, "random seed")
    out: str = _opt("", "run folder; empty = trained_models/<data name>-<image size>")
    resume: str = _opt("", "'auto' (the run folder's last.pt, if any) or a checkpoint path")
    nproc: int = _opt(1, "CPU processes when there is no GPU")
    save_every: int = _opt(1, "epochs between last.pt saves")
    max_nonfinite_steps: int = _opt(10, "consecutive skipped non-finite steps before "
                                        "training gives up")
    # extra loss terms on the predicted mask (see loss_fn); weights, 0 = off
    loss_dice: float = _opt(0.0, "weight of the soft Dice term")
    loss_boundary: float = _opt(0.0, "weight of the boundary loss (Kervadec et al. 2019)")
    loss_hausdorff: float = _opt(0.0, "weight of the Hausdorff distance-transform loss")
    loss_adversarial: float = _opt(0.0, "weight of the PatchGAN adversarial term")
    adversarial_loss: str = _opt("hinge", "adversarial objective",
                                 choices=("hinge", "nonsaturating"))
    disc_lr: float = _opt(2e-4, "learning rate of the discriminator")
    log_every: int = _opt(10, "steps between loss logs")

    def __post_init__(self):
        self.channel_mults = tuple(self.channel_mults)
        self.attention_resolutions = tuple(self.attention_resolutions)
        for f in dataclasses.fields(self):
            allowed = f.metadata.get("choices")
            if allowed and getattr(self, f.name) not in allowed:
                raise ValueError(f"{f.name} must be one of {allowed}, got {getattr(self, f.name)!r}")
        if not (math.isfinite(self.schedule_shift) and self.schedule_shift > 0):
            raise ValueError(f"schedule_shift must be a finite number > 0, got {self.schedule_shift}")
        if self.max_minutes < 0:  # `python main.py` is a demo that must end on a laptop CPU
            self.max_minutes = 8.0 if self.data is None else 0.0
        if not self.out:
            name = Path(self.data).name if self.data else "synthetic"
            self.out = str(Path("trained_models") / f"{name}-{self.image_size}")

    def to_dict(self):
        """Plain types only (lists, not tuples), so torch.load(weights_only=True) reads it."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        return cls(**d)


# Settings a resumed run may change from the command line without breaking its meaning.
RUN_LENGTH_KEYS = ("epochs", "max_minutes", "patience", "eval_every")


def resume_config(cfg, explicit):
    """The config a resumed run uses: the stored one, with the run-length flags the user
    gave (`explicit`) on top. A flag that changes the model or diffusion is an error.
    Returns (config, path of the checkpoint); a fresh run returns (cfg, None)."""
    path = find_resume_checkpoint(cfg)
    if path is None:
        return cfg, None
    stored = TrainConfig.from_dict(read_checkpoint(path)["config"]).to_dict()
    current = cfg.to_dict()
    clash = [k for k in MODEL_KEYS if k in explicit and current[k] != stored[k]]
    if clash:
        raise CheckpointError(
            f"cannot resume {path} with a different model or diffusion: "
            + ", ".join(f"--{k.replace('_', '-')} {current[k]} (run has {stored[k]})"
                        for k in clash) + ". Start a new run with another --out.")
    # run-length flags override; so do where-and-how flags (out, resume, nproc, workers)
    for k in (*RUN_LENGTH_KEYS, "out", "resume", "nproc", "num_workers", "log_every"):
        if k in explicit or k in ("out", "resume"):
            stored[k] = current[k]
    ignored = [k for k in explicit if k not in stored or
               (stored[k] != current[k] and k not in MODEL_KEYS)]
    if ignored:
        print0(f"resume: keeping the run's stored {', '.join(sorted(ignored))}; "
               f"only {', '.join(RUN_LENGTH_KEYS)} can change on resume")
    return TrainConfig.from_dict(stored), path


def find_resume_checkpoint(cfg):
    """The checkpoint `cfg.resume` names. "auto": the run folder's last.pt, or, when that is
    missing, truncated or corrupt, the last_prev.pt kept beside it (the bad file is renamed
    *.corrupt so the next save cannot displace the good one). None for a fresh start."""
    if not cfg.resume:
        return None
    if cfg.resume != "auto":
        path = Path(cfg.resume)
        read_checkpoint(path)  # a clear error now for a missing, corrupt or unsafe file
        return path
    last = Path(cfg.out) / "last.pt"
    candidates = [p for p in (last, previous_checkpoint(last)) if p.is_file()]
    errors = []
    for path in candidates:
        try:
            read_checkpoint(path)
        except CheckpointError as e:
            errors.append(str(e))
            print0(f"resume: {e}")
            if is_main():
                os.replace(path, path.with_name(path.name + ".corrupt"))
            continue
        if errors:
            print0(f"resume: falling back to the previous checkpoint {path}")
        return path
    if errors:
        raise CheckpointError(f"no usable checkpoint to resume in {cfg.out}: "
                              + " | ".join(errors))
    return None


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


# --------------------------------------------------------------- the RNGs
def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": _numpy_state_to_plain(np.random.get_state())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _numpy_state_to_plain(s):
    return [s[0], torch.from_numpy(s[1].astype(np.int64)), int(s[2]), int(s[3]), float(s[4])]


def _numpy_state_from_plain(s):
    return (s[0], s[1].numpy().astype(np.uint32), s[2], s[3], s[4])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


# ------------------------------------------------------------------- the log
class MetricsLog:
    """metrics.csv in the run folder, written by rank 0: one row per log interval and one
    per validation, with a column for each part `loss_fn` reports. On resume, rows after
    the checkpoint's step are dropped."""

    def __init__(self, path, part_names, resume_step=None):
        self.path = Path(path)
        self.columns = ["epoch", "step", "loss", *part_names, "val_mse", "val_iou", "lr",
                        "images_per_s", "elapsed_s"]
        self.enabled = is_main()
        if not self.enabled:
            return
        rows = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def write(self, **row):
        if self.enabled:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.columns).writerow({k: _fmt(v) for k, v in row.items()})


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


# ----------------------------------------------------------------- validation
@torch.no_grad()
def validate(ema_model, diffusion, loader, cfg, device, dtype):
    """EMA model on the validation set: (val_mse, val_iou, first batch for pictures).

    val_mse: the diffusion MSE (model output against its target) at a timestep and noise
    seeded by each image's index; val_iou: `eval_steps` DDIM steps (eta=0) from a start noise
    seeded the same way, threshold 0.5, averaged over images (two empty masks count as IoU
    1). So both are comparable across validations, batch sizes and process counts. Both are
    all-reduced as [sum, count], so every rank holds the same numbers.
    """
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # mse sum, iou sum, images
    vis = None
    for index, image, mask in loader:
        image = image.to(device, non_blocking=True)
        mask = mask.to(device, non_blocking=True)
        x0 = mask * 2 - 1
        gens = [torch.Generator().manual_seed(cfg.seed * 100_003 + int(i)) for i in index]
        t = torch.cat([torch.randint(0, diffusion.num_timesteps, (1,), generator=g)
                       for g in gens]).to(device)
        noise = torch.stack([torch.randn(mask.shape[1:], generator=g) for g in gens]).to(device)
        start = torch.stack([torch.randn(mask.shape[1:], generator=g) for g in gens])
        x_t, _ = diffusion.noise_image(x0, t, noise)
        with autocast(device, dtype):
            out = ema_model(torch.cat([x_t, image], dim=1), t)
        per_image = (out.float() - diffusion.training_target(x0, noise, t)).pow(2).flatten(1)
        with autocast(device, dtype):
            probs = diffusion.sample(ema_model, image, steps=cfg.eval_steps, noise=start,
                                     generator=gens[0])  # the ancestral sampler's later draws
        sums += torch.stack([per_image.mean(1).sum(),
                             overlap_scores(probs > 0.5, mask > 0.5)[1].sum(),
                             torch.tensor(float(len(index)), device=device)]).double()
        if vis is None:
            vis = (image[:cfg.num_vis].cpu(), mask[:cfg.num_vis].cpu(),
                   probs[:cfg.num_vis].float().cpu())
    if get_world_size() > 1:
        dist.all_reduce(sums)
    mse_sum, iou_sum, count = sums.tolist()
    return mse_sum / max(count, 1), iou_sum / max(count, 1), vis


class IndexedDataset(torch.utils.data.Dataset):
    """Yields (index, image, mask), so validation can seed t and noise per image."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return (i, *self.dataset[i])


# ------------------------------------------------------------------- training
class Adversary:
    """The PatchGAN critic behind the adversarial term: its own optimiser and GradScaler,
    DDP-wrapped when distributed, trained one step after each denoiser step."""

    def __init__(self, cfg, device, dtype, world):
        from model import PatchDiscriminator
        self.kind = cfg.adversarial_loss
        self.device, self.dtype = device, dtype
        self.net = PatchDiscriminator(in_channels=cfg.channels + 1).to(device)
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


class TrainResult(NamedTuple):
    ema_model: torch.nn.Module
    samples: Optional[torch.Tensor]     # (N, 1, H, W) EMA sample probabilities, last validation
    contours: Optional[torch.Tensor]    # (N, 1, H, W) the true masks of those images
    images: Optional[torch.Tensor]      # (N, C, H, W) the images themselves
    best: dict                          # best val IoU / MSE and where training stopped


def pick_device():
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def train(cfg, resume_from=None):
    """Train a DDPM-v2 model as `cfg` says; the caller has set up the process group (if
    any). `resume_from` is the checkpoint to continue (see `resume_config`); by default
    `cfg.resume` is followed. Returns a TrainResult on every rank."""
    from dataset import WithDistanceMaps, build_datasets, make_loader, set_epoch

    rank, world = get_rank(), get_world_size()
    device = pick_device()
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is the global batch and must divide "
                         f"by the {world} processes; try {cfg.batch_size - cfg.batch_size % world or world}")
    batch_per_rank = cfg.batch_size // world
    out = Path(cfg.out)
    if resume_from is None:
        resume_from = find_resume_checkpoint(cfg)
    if resume_from is None and cfg.resume != "auto" and any(
            (out / name).is_file() for name in ("last.pt", "last_prev.pt")):
        raise FileExistsError(f"{out} already holds a run (last.pt); pass --resume auto to "
                              f"continue it or --out to start a new one")
    # ---- data
    datasets = build_datasets(cfg.data, image_size=cfg.image_size, channels=cfg.channels,
                              val_fraction=cfg.val_fraction, seed=cfg.seed,
                              augment=cfg.augment,
                              synthetic_sizes=(cfg.synthetic_train, cfg.synthetic_val,
                                               cfg.synthetic_test))
    if cfg.loss_boundary or cfg.loss_hausdorff:
        datasets["train"] = WithDistanceMaps(datasets["train"])  # computed in the workers
    workers = None if cfg.num_workers < 0 else cfg.num_workers
    train_loader = make_loader(datasets["train"], batch_per_rank, train=True,
                               distributed=world > 1, num_workers=workers, seed=cfg.seed,
                               device=device)
    val_shard = torch.utils.data.Subset(IndexedDataset(datasets["val"]),
                                        range(rank, len(datasets["val"]), world))
    val_loader = make_loader(val_shard, batch_per_rank, train=False, distributed=False,
                             num_workers=workers, seed=cfg.seed, device=device)
    if len(train_loader) == 0:
        raise ValueError(f"{len(datasets['train'])} training images give no full batch of "
                         f"{batch_per_rank} per process; lower --batch-size")

    # ---- model, EMA, optimiser: same init on every rank
    seed_everything(cfg.seed)
    raw_model, diffusion = build_model_and_diffusion(cfg.to_dict())
    check_run_folder(out, raw_model)   # every rank, so all fail together before training
    raw_model.to(device)
    diffusion.to(device)
    channels_last = cfg.channels_last and device.type == "cuda"  # slower on CPU convolutions
    if channels_last:
        raw_model.to(memory_format=torch.channels_last)
    dtype = amp_dtype(cfg.amp, device)
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1)))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = EMA(raw_model, cfg.ema_decay, cfg.ema_warmup)
    adversary = Adversary(cfg, device, dtype, world) if cfg.loss_adversarial else None
    # "epoch" counts finished epochs; "batch" the batches already trained of the next one
    # (non-zero only when --max-minutes stopped a run inside an epoch)
    best = {"epoch": 0, "batch": 0, "step": 0, "best_iou": -1.0, "best_mse": math.inf,
            "patience_iou": -1.0, "bad_evals": 0, "val_iou": None, "val_mse": None,
            "skipped_steps": 0}
    pending_rng = None

    if resume_from is not None:
        state = read_checkpoint(resume_from)
        check_model_config(state["config"], cfg.to_dict(), resume_from)
        raw_model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when the run had no fp16 scaler
            scaler.load_state_dict(state["scaler"])
        if adversary is not None:
            if state.get("adversary") is None:
                raise CheckpointError(f"{resume_from} has no discriminator to resume")
            adversary.load_state_dict(state["adversary"])
        best.update({k: state[k] for k in best if k in state})
        if "patience_iou" not in state:  # written before best and patience were separate
            best["patience_iou"] = best["best_iou"]
        rngs = state["rng"]
        if best["batch"] and len(rngs) != world:
            print0(f"resume: the run stopped inside epoch {best['epoch'] + 1} with "
                   f"{len(rngs)} processes, now {world}; the shards differ, so that epoch "
                   f"restarts from its first batch")
            best["batch"] = 0
        if len(rngs) == world:
            pending_rng = rngs[rank]   # restored once the loader is where the run stopped
        else:
            print0(f"resume: the run had {len(rngs)} processes, now {world}; RNG streams "
                   f"restart from the seed, so losses will not match step for step")
            seed_everything(cfg.seed + 1000 * best["epoch"] + rank)
        print0(f"resumed from {resume_from} at epoch {best['epoch']}"
               + (f", batch {best['batch']}" if best["batch"] else "")
               + f" (step {best['step']})")
    else:
        seed_everything(cfg.seed + rank)  # per-rank streams for t, noise and augmentation

    model = raw_model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:  # compile(DDP(m)) lets DDP overlap all-reduce with the backward graph
        model = torch.compile(model)

    log = running = None  # made at the first step, when loss_fn has named its parts
    control = dist.new_group(backend="gloo") if world > 1 and device.type == "cuda" else None
    stop = StopSignal(control)
    print0(f"training on {world} x {device.type}, {len(datasets['train'])} train / "
           f"{len(datasets['val'])} val images, {batch_per_rank} per process per step, "
           f"amp={dtype}, run folder {out}")

    start = time.time()
    time_over = lambda: cfg.max_minutes > 0 and time.time() - start > 60 * cfg.max_minutes  # noqa: E731
    step = last_eval_step = last_save_step = best["step"]
    nonfinite_streak = 0
    vis = None
    stopped = early_stop = False
    for epoch in range(best["epoch"], cfg.epochs):
        set_epoch(train_loader, epoch)
        model.train()
        bar = tqdm(train_loader, disable=not is_main(), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   leave=False, dynamic_ncols=True)
        tick, images_seen = time.time(), 0
        batches = iter(bar)
        skip = best["batch"] if epoch == best["epoch"] else 0
        for _ in range(skip):  # resuming inside an epoch: these batches were trained on
            next(batches)
        if pending_rng is not None:  # after the skipped batches drew their augmentation
            set_rng_state(pending_rng)
            if "cuda" not in pending_rng and device.type == "cuda":
                torch.cuda.manual_seed(cfg.seed + 1000 * epoch + rank)
            pending_rng = None
        batches_done = skip
        for batch_index in range(skip, len(train_loader)):
            if stop.poll(time_over()):  # before fetching, so a resume fetches the same batch
                stopped = True
                break
            batch = next(batches)
            batches_done = batch_index + 1
            image, mask, *extra = (x.to(device, non_blocking=True) for x in batch)
            distances = extra[0] if extra else None                   # (B, 1, H, W)
            x0 = mask * 2 - 1                                         # (B, 1, H, W) in {-1, 1}
            t = diffusion.sample_timesteps(x0.shape[0], device=device)
            x_t, noise = diffusion.noise_image(x0, t)                 # fp32 schedule math
            x_in = torch.cat([x_t, image], dim=1)                     # (B, 1 + C, H, W)
            if channels_last:
                x_in = x_in.contiguous(memory_format=torch.channels_last)
            with autocast(device, dtype):
                output = model(x_in, t)                               # (B, 1, H, W)
            loss, parts = loss_fn(output.float(), diffusion.training_target(x0, noise, t),
                                  diffusion=diffusion, x_t=x_t, t=t, mask=mask, image=image,
                                  cfg=cfg, distances=distances,
                                  discriminator=adversary.frozen() if adversary else None)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            # Skip a step whose gradient is not finite. Gradients are all-reduced, so every
            # rank takes the same decision. Deciding costs the step's one host sync; under
            # fp16 it replaces scaler.step's own check (a second sync): unscale_ has recorded
            # the overflow, and scaler.update() lowers the scale from that record.
            finite = bool(torch.isfinite(grad_norm))
            if finite:
                optimizer.step()
            if scaler.is_enabled():
                scaler.update()
            if not finite:
                best["skipped_steps"] += 1
                # fp16's first overflows only calibrate the loss scale: a streak starts
                # counting once the scale has fallen below 1
                if not scaler.is_enabled() or scaler.get_scale() < 1:
                    nonfinite_streak += 1
                    print0(f"step {step + 1}: non-finite loss or gradient, step skipped "
                           f"({nonfinite_streak} in a row, {best['skipped_steps']} in all)")
                if nonfinite_streak >= cfg.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{nonfinite_streak} consecutive steps had a non-finite loss or "
                        f"gradient; stopping. The last good checkpoint is {out / 'last.pt'}. "
                        f"Try a lower --lr, --amp off or bf16, or check loss_fn")
                continue
            nonfinite_streak = 0
            scheduler.step()
            step += 1
            ema.update(raw_model, step)
            if adversary is not None:
                fake, _ = diffusion.predict_x0_eps(x_t, t, output.detach().float())
                parts["critic"] = adversary.step(image, mask, (fake + 1) / 2)
            if log is None:
                part_names = list(parts)
                log = MetricsLog(out / "metrics.csv", part_names,
                                 resume_step=best["step"] if resume_from is not None else None)
                running, running_steps = torch.zeros(1 + len(part_names), device=device), 0
            running += torch.stack([loss.detach(), *(parts[k] for k in part_names)])
            running_steps += 1
            images_seen += x0.shape[0] * world

            if step % cfg.log_every == 0:
                if world > 1:
                    dist.all_reduce(running)
                means = (running / (running_steps * world)).tolist()
                speed = images_seen / (time.time() - tick)
                lr = scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{means[0]:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.1f}")
                log.write(epoch=epoch + 1, step=step, loss=means[0], lr=lr, images_per_s=speed,
                          elapsed_s=time.time() - start,
                          **dict(zip(part_names, means[1:])))
                running.zero_()
                running_steps = 0
                tick, images_seen = time.time(), 0
        bar.close()
        stopped = stop.settle(stopped or time_over())
        if batches_done == len(train_loader):
            best["epoch"], best["batch"] = epoch + 1, 0
        else:  # stopped inside the epoch: a resume trains its remaining batches
            best["epoch"], best["batch"] = epoch, batches_done
        best["step"] = step
        finishing = stopped or epoch + 1 == cfg.epochs

        saves = []
        if last_eval_step != step and (finishing or (epoch + 1) % cfg.eval_every == 0):
            last_eval_step = step
            val_mse, val_iou, vis = validate(ema.model, diffusion, val_loader, cfg, device, dtype)
            saves += record_validation(best, val_iou, val_mse, cfg.min_delta)
            early_stop = best["bad_evals"] >= cfg.patience
            finishing = finishing or early_stop
            print0(f"epoch {epoch + 1}: val_mse {val_mse:.4f}  val_iou {val_iou:.4f}  "
                   f"(best {best['best_iou']:.4f}, {best['bad_evals']}/{cfg.patience} without gain)")
            log.write(epoch=epoch + 1, step=step, val_mse=val_mse, val_iou=val_iou,
                      lr=scheduler.get_last_lr()[0], elapsed_s=time.time() - start)
            saves.append(f"samples_epoch{epoch + 1:04d}.png")
        if last_save_step != step and (finishing or (epoch + 1) % cfg.save_every == 0):
            saves.append("last.pt")
        if saves:
            state = checkpoint_state(raw_model, ema, optimizer, scheduler, scaler, best, cfg,
                                     adversary)
            failure = None
            if is_main():
                try:
                    for name in saves:
                        if name.endswith(".png"):
                            save_images(out / name, *vis)
                        else:
                            save_checkpoint(state, out / name, keep_previous=name == "last.pt")
                except Exception as e:  # any failure: the other ranks must hear of it
                    failure = e
            # every rank learns whether rank 0 saved, instead of waiting at a barrier
            if all_reduce_sums([float(failure is not None)], device)[0] > 0:
                if failure is not None and not isinstance(failure, OSError):
                    raise failure
                raise RunFolderError(f"could not write to the run folder {out}: "
                                     f"{failure or 'rank 0 failed to save'}")
            if "last.pt" in saves:
                last_save_step = step
        if stopped or early_stop:
            print0(f"stopping after epoch {epoch + 1}: "
                   + ("time budget reached" if stopped else
                      f"val IoU has not improved for {cfg.patience} validations"))
            break

    best["stopped_early"] = early_stop
    best["stopped_by_time"] = stopped
    images, contours, samples = vis if vis is not None else (None, None, None)
    return TrainResult(ema.model, samples, contours, images, best)


def record_validation(best, val_iou, val_mse, min_delta):
    """Fold one validation into the run's record; returns the best_*.pt files to write.

    best_iou.pt follows every val IoU gain, however small. The patience count restarts
    only on a gain of more than min_delta over the IoU at its last restart, so a run whose
    IoU creeps up by less than min_delta per validation still stops, with its best model.
    """
    best["val_mse"], best["val_iou"] = val_mse, val_iou
    saves = []
    if val_iou > best["patience_iou"] + min_delta:
        best["patience_iou"], best["bad_evals"] = val_iou, 0
    else:
        best["bad_evals"] += 1
    if val_iou > best["best_iou"]:
        best["best_iou"] = val_iou
        saves.append("best_iou.pt")
    if val_mse < best["best_mse"]:
        best["best_mse"] = val_mse
        saves.append("best_mse.pt")
    return saves


def checkpoint_state(raw_model, ema, optimizer, scheduler, scaler, best, cfg, adversary=None):
    """One dict, plain types and tensors only. Gathers every rank's RNG state (a collective:
    all ranks call it)."""
    check_finite(unwrap(raw_model).state_dict(), "the model")
    check_finite(ema.state_dict(), "the EMA model")
    if adversary is not None:
        check_finite(adversary.net.state_dict(), "the discriminator")
    rngs = [None] * get_world_size()
    if get_world_size() > 1:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    return {
        "format_version": CHECKPOINT_VERSION,
        "model": unwrap(raw_model).state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        **best,
        "adversary": adversary.state_dict() if adversary is not None else None,
        "rng": rngs,
        "config": cfg.to_dict(),
    }
