"""Small helpers: the run's config (the checkpoint's schema), checkpoint I/O, resume and RNG
state, rank-aware printing, pictures, mask metrics and ensemble fusion.

Imports one way: this file reads `model.py`, `DDPM.py` and `dataset.py`; `train_utils.py`,
`main.py` and `evaluate.py` read it.
"""
import dataclasses
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from dataset import EMPTY_SLICE_FRACTION, FIT_MODES, is_nnunet, read_dataset_json
from DDPM import (INPUT_SCALINGS, LOSS_WEIGHTINGS, PREDICTION_TYPES, REPRESENTATIONS,
                  SCHEDULES, TIMESTEP_SAMPLING, Diffusion, mask_channels)
from model import MODELS, build_model

CHECKPOINT_VERSION = 1

# Config fields that decide the network's shape or the diffusion process: a checkpoint can
# only be loaded, or a run resumed, when these match. The UNet2D fields count only for it.
UNET_KEYS = ("base_channels", "channel_mults", "num_res_blocks", "attention_resolutions",
             "dropout")
DIFFUSION_KEYS = ("timesteps", "schedule", "schedule_shift", "prediction", "self_condition",
                  "num_classes", "representation", "input_scaling", "time_floor")
# keys added after checkpoints were already being written: what an older one meant (the
# model's, and term_weighting, whose default changed from the behaviour before it existed)
LATER_MODEL_KEYS = {"schedule_shift": 1.0, "model": "unet2d", "self_condition": False,
                    "num_classes": 2, "representation": "onehot", "input_scaling": "none",
                    "time_floor": 0.0, "term_weighting": "abar"}


def model_keys(config):
    """The config keys that must match for `config` (a dict) to load or resume."""
    unet = UNET_KEYS if config.get("model", "unet2d") == "unet2d" else ()
    return ("channels", "model", *unet, *DIFFUSION_KEYS)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, unsafe, or made for another model."""


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
    flips: str = _opt("auto", "random flips in --augment: auto = on for binary masks, off for "
                              "label maps (--num-classes > 2), whose classes may be left or "
                              "right of something, as the lungs are", choices=("auto", "on", "off"))
    val_fraction: float = _opt(-1.0, "fraction held back as val when the data has no val "
                                     "split (of train; of all pairs for a flat folder); -1 = "
                                     "the rule: 10%%, at least min(20 images, 20%%)")
    num_workers: int = _opt(-1, "data loader workers per process; -1 picks a default")
    synthetic_train: int = _opt(1000, "training images of the synthetic set")
    synthetic_val: int = _opt(100, "validation images of the synthetic set")
    synthetic_test: int = _opt(100, "test images of the synthetic set")
    mask_values: tuple = _opt((), "stored mask values that are foreground (e.g. --mask-values "
                                   "255, or 1 2 for two labels of a label map); "
                                   "none: threshold at --mask-threshold")
    num_classes: int = _opt(2, "classes, background included: 2 = a binary mask; K > 2 = a "
                               "label map with values 0..K-1 (or --class-values)")
    class_values: tuple = _opt((), "the K stored values of a label map, in class order (e.g. "
                                    "--class-values 0 150 200 250); none: values 0..K-1")
    mask_threshold: float = _opt(0.5, "foreground where the mask is >= this fraction of "
                                      "full scale (without --mask-values)")
    mask_suffix: str = _opt("", "ending of mask file names after the image's name "
                                "(e.g. _mask pairs a.png with a_mask.png)")
    allow_soft_masks: bool = _opt(False, "accept soft (probability) masks; they are "
                                         "thresholded at --mask-threshold")
    fit: str = _opt("pad", "non-square images: pad to a square, stretch, or crop the "
                           "centre", choices=FIT_MODES)
    test_fraction: float = _opt(0.1, "fraction held back as test split from a flat "
                                     "images/ + masks/ folder")
    slice_axis: int = _opt(-1, "volumes (NIfTI): the axis they are sliced along")
    window: tuple = _opt((), "volumes: intensity window LOW HIGH in stored units (HU for CT, "
                             "e.g. --window -1000 400) of the channels dataset.json names CT "
                             "(all, if none is); others: each volume's 0.5-99.5 percentiles",
                         item=float)
    empty_slice_fraction: float = _opt(EMPTY_SLICE_FRACTION,
                                       "nnU-Net layout: at most this fraction of the training "
                                       "slices show no foreground (the rest are dropped)")
    # model
    model: str = _opt("unet2d", "backbone from model.MODELS: unet2d, convnext_tiny, resnet18, "
                                "or one you registered; the five flags below are unet2d's")
    base_channels: int = _opt(16, "UNet width at full resolution")
    channel_mults: tuple = _opt((1, 2, 4, 8), "width multiplier per UNet level")
    num_res_blocks: int = _opt(1, "residual blocks per UNet level")
    attention_resolutions: tuple = _opt((8,), "downsampling factors with self-attention")
    dropout: float = _opt(0.0, "dropout in residual blocks")
    # diffusion
    timesteps: int = _opt(1000, "diffusion steps T")
    schedule: str = _opt("cosine", "noise schedule", choices=SCHEDULES)
    schedule_shift: float = _opt(0.0, "divide the schedule's signal-to-noise ratio by "
                                      "shift^2 at every step; > 1 = noisier (large masks); "
                                      "0 = by --image-size (size_defaults)")
    prediction: str = _opt("x0_logits", "what the network predicts (x0_logits: the clean "
                                        "mask's logits, trained with cross-entropy)",
                           choices=PREDICTION_TYPES)
    self_condition: bool = _opt(False, "self-conditioning (Chen et al. 2022): the network also "
                                       "sees its previous estimate of the mask")
    timestep_sampling: str = _opt("uniform", "density of training timesteps (logit_normal: "
                                             "Esser et al. 2024)", choices=TIMESTEP_SAMPLING)
    loss_weighting: str = _opt("none", "weight of the diffusion loss over timesteps "
                                       "(min_snr: Hang et al. 2023)", choices=LOSS_WEIGHTINGS)
    min_snr_gamma: float = _opt(5.0, "gamma of --loss-weighting min_snr")
    input_scaling: str = _opt("auto", "the noisy mask the network sees: abar = sqrt(abar_t) "
                                      "x_t, its linear estimate of the clean mask (noise "
                                      "without signal arrives as ~0); none = x_t; auto = "
                                      "abar, but none for --prediction eps, which needs x_t",
                              choices=("auto", *INPUT_SCALINGS))
    time_floor: float = _opt(1e-3, "timesteps whose abar_t (signal fraction of x_t) is "
                                   "below this reach the network as one timestep; 0 = off")
    representation: str = _opt("onehot", "a label map of K > 2 classes in diffusion space: K "
                                         "one-hot channels, or ceil(log2 K) analog bits (Chen "
                                         "et al. 2022)", choices=REPRESENTATIONS)
    # optimisation
    epochs: int = _opt(0, "cap on passes over the training data; 0 = none")
    max_steps: int = _opt(0, "cap on optimiser steps; 0 = none")
    batch_size: int = _opt(0, "global batch size, split across processes; 0 = by "
                              "--image-size (size_defaults)")
    lr: float = _opt(1e-3, "AdamW learning rate after warm-up")
    lr_schedule: str = _opt("constant", "after warm-up: constant, or cosine decay to 0 at "
                                        "--max-steps", choices=("constant", "cosine"))
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
    val_every: int = _opt(0, "optimiser steps between validations (each also saves "
                             "last.pt); 0 = by the val set's size (run_length_defaults)")
    eval_steps: int = _opt(0, "DDIM steps for validation IoU; 0 = by --image-size")
    patience: int = _opt(0, "optimiser steps without a val IoU gain of --min-delta before "
                            "stopping; 0 = the rule (run_length_defaults)")
    min_steps: int = _opt(0, "no early stop before this many optimiser steps; 0 = the rule")
    min_delta: float = _opt(1e-3, "smallest val IoU gain that restarts the patience count; "
                                  "best_iou.pt takes the latest weights within it of the "
                                  "best val IoU")
    max_minutes: float = _opt(-1.0, "wall-clock budget of this process's training (a resume "
                                    "gets it again); 0 = none; -1 = 8 for the synthetic "
                                    "demo, none with --data")
    num_vis: int = _opt(4, "validation images in each sample picture")
    # run
    seed: int = _opt(0, "random seed")
    out: str = _opt("", "run folder; empty = trained_models/<data name>-<image size>")
    resume: str = _opt("", "'auto' (the run folder's last.pt, if any) or a checkpoint path")
    nproc: int = _opt(1, "CPU processes when there is no GPU")
    max_nonfinite_steps: int = _opt(10, "consecutive skipped non-finite steps before "
                                        "training gives up")
    # extra loss terms on the predicted mask (see loss_fn); weights, 0 = off. The defaults
    # (x0_logits + Dice at every t) are the U-Net baseline's objective: RESULTS.md, "Where
    # the jsrt-lungs gap lies"
    loss_dice: float = _opt(1.0, "weight of the soft Dice term")
    loss_boundary: float = _opt(0.0, "weight of the boundary loss (Kervadec et al. 2019)")
    loss_hausdorff: float = _opt(0.0, "weight of the Hausdorff distance-transform loss")
    loss_adversarial: float = _opt(0.0, "weight of the PatchGAN adversarial term")
    term_weighting: str = _opt("uniform", "how the terms above weigh each timestep: abar_t "
                                          "(near 0 at high noise) or uniform (1 at every t)",
                               choices=("abar", "uniform"))
    adversarial_loss: str = _opt("hinge", "adversarial objective",
                                 choices=("hinge", "nonsaturating"))
    disc_lr: float = _opt(2e-4, "learning rate of the discriminator")
    log_every: int = _opt(10, "steps between loss logs")
    auto_fields: tuple = _opt((), "the settings a rule chose (filled in, not a flag)", cli=False)

    def __post_init__(self):
        self.channel_mults = tuple(self.channel_mults)
        self.attention_resolutions = tuple(self.attention_resolutions)
        self.mask_values = tuple(int(v) for v in self.mask_values)
        self.class_values = tuple(int(v) for v in self.class_values)
        if self.num_classes < 2:
            raise ValueError(f"num_classes counts background too and must be >= 2, "
                             f"got {self.num_classes}")
        if self.num_classes > 2 and self.mask_values:
            raise ValueError("--mask-values picks the foreground of a binary mask; a label map "
                             "of --num-classes > 2 maps its stored values with --class-values")
        self.window = tuple(float(v) for v in self.window)
        if self.window and (len(self.window) != 2 or self.window[0] >= self.window[1]):
            raise ValueError(f"--window takes LOW HIGH with LOW < HIGH, got {list(self.window)}")
        if not 0 <= self.empty_slice_fraction <= 1:
            raise ValueError(f"empty_slice_fraction must be in [0, 1], got {self.empty_slice_fraction}")
        if self.num_classes == 2:
            self.representation = "onehot"   # one channel either way; keep checkpoints alike
        if self.num_classes > 2 and self.data is None:
            raise ValueError("the built-in synthetic set is binary: give --data with label "
                             "maps for --num-classes > 2")
        if self.class_values and (self.num_classes == 2
                                  or len(set(self.class_values)) != self.num_classes):
            raise ValueError(f"--class-values lists the {self.num_classes} distinct stored "
                             f"values of a label map of --num-classes > 2, in class order; got "
                             f"{list(self.class_values)} (a binary mask takes --mask-values)")
        for f in dataclasses.fields(self):
            allowed = f.metadata.get("choices")
            if allowed and getattr(self, f.name) not in allowed:
                raise ValueError(f"{f.name} must be one of {allowed}, got {getattr(self, f.name)!r}")
        rules = size_defaults(self.image_size)
        auto = [k for k in rules if not getattr(self, k)]
        for k in auto:
            setattr(self, k, rules[k])
        if self.input_scaling == "auto":   # eps is read off x_t: it must see x_t itself
            self.input_scaling = "none" if self.prediction == "eps" else "abar"
            auto.append("input_scaling")
        if not self.eval_steps:   # follows the shift actually used, given or by rule
            self.eval_steps = validation_steps(self.schedule_shift)
            auto.append("eval_steps")
        self.auto_fields = tuple(sorted({*self.auto_fields, *auto}))
        if not (self.val_fraction == -1 or 0 <= self.val_fraction < 1):
            raise ValueError(f"val_fraction must be in [0, 1), or -1 for the rule; "
                             f"got {self.val_fraction}")
        if not 0 <= self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        if not (math.isfinite(self.schedule_shift) and self.schedule_shift > 0):
            raise ValueError(f"schedule_shift must be a finite number > 0, got {self.schedule_shift}")
        if self.lr_schedule == "cosine" and self.max_steps <= 0:
            raise ValueError("--lr-schedule cosine decays to 0 at --max-steps: give --max-steps")
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
        """The config a checkpoint stored. Keys older checkpoints lack take the value they
        had then (LATER_MODEL_KEYS); a patience counted in validations (before step
        budgets) cannot be converted and becomes the step rule."""
        d = {**LATER_MODEL_KEYS, **d}
        if "eval_every" in d:   # before step budgets: patience counted validations
            d = {k: v for k, v in d.items() if k not in ("eval_every", "save_every")}
            d["patience"] = 0                     # the rule, in steps
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        return cls(**d)

    def flips_on(self):
        """Whether --augment (when on) flips training images: --flips on, or auto on a
        binary mask."""
        return self.flips == "on" or (self.flips == "auto" and self.num_classes == 2)

    def trained_mirrored(self):
        """Whether the run saw its images flipped in both axes: evaluate.py's --mirror auto.
        Folder data only: the synthetic set is not augmented (each item is new)."""
        return self.data is not None and self.augment and self.flips_on()

    def describe_auto(self):
        """One line naming the settings a rule chose, for the start of a run."""
        return ", ".join(f"{k.replace('_', '-')} {_fmt_value(getattr(self, k))}"
                         for k in self.auto_fields)


def _fmt_value(value):
    return value if isinstance(value, str) else f"{value:g}"


def data_defaults(cfg, explicit=()):
    """Settings the data itself states, filled into a fresh config (not a stored one): on
    nnU-Net's layout, --num-classes and --channels from dataset.json (labels,
    channel_names); a flag in `explicit` that disagrees is refused. Returns cfg."""
    if not is_nnunet(cfg.data):
        return cfg
    meta = read_dataset_json(cfg.data)
    for key, value in (("num_classes", len(meta["labels"])), ("channels", len(meta["channels"]))):
        if key in explicit and getattr(cfg, key) != value:
            raise ValueError(f"--{key.replace('_', '-')} {getattr(cfg, key)}: "
                             f"{cfg.data}/dataset.json lists {value}")
        setattr(cfg, key, value)
    if cfg.num_classes == 2:
        cfg.representation = "onehot"
    return cfg


# --------------------------------------------------------- defaults that follow the data
SIZE_RULES = """batch_size: 16 x 64 / image_size, within 4..16 (the same pixels per step);
schedule_shift: (image_size / 16)^2, so 16 at 64 px, 64 at 128 px (both measured best
among the shifts tried), 256 at 256 px (not measured);
eval_steps: 1 DDIM step for validation when the shift (given or by rule) is >= 16, else 10"""


def size_defaults(image_size):
    """The settings that follow the image size (SIZE_RULES), for a config that leaves them
    at 0. The batch shrinks as images grow, so a step's cost grows only linearly with the
    side. Chosen by measurement: benchmarks/RESULTS.md, "Defaults by image size"."""
    return {"batch_size": int(min(16, max(4, 16 * 64 // image_size))),
            "schedule_shift": float(max(1.0, (image_size / 16) ** 2))}


def validation_steps(schedule_shift):
    """DDIM steps for validation IoU: with a large shift one step scores as well as more
    (RESULTS.md, "Sampling steps with a large shift"), and costs a tenth."""
    return 1 if schedule_shift >= 16 else 10


def run_length_defaults(cfg, num_val):
    """Validation cadence and early stopping in optimiser steps, for the fields left at 0:
      val_every  max(100, 7 x val images x (1 + eval_steps) / batch): a validation runs
                 1 + eval_steps forward passes per val image, a training step about 3 per
                 image, so this keeps validation near 1/21 (5%) of the steps' time however
                 large the val set;
      patience   10 validations' worth of steps (at least 1000);
      min_steps  no early stop before max(1000, 10 x the warm-up) steps.
    Counting steps, not epochs, makes these mean the same for 20 images and 20,000
    (nnU-Net fixes its "epoch" at 250 iterations for the same reason)."""
    val_every = cfg.val_every or max(100, math.ceil(7 * num_val * (1 + cfg.eval_steps)
                                                    / cfg.batch_size))
    return {"val_every": val_every,
            "patience": cfg.patience or max(1000, 10 * val_every),
            "min_steps": cfg.min_steps or max(1000, 10 * cfg.warmup_steps)}


# Settings a resumed run may change from the command line without breaking its meaning.
RUN_LENGTH_KEYS = ("epochs", "max_steps", "max_minutes", "patience", "min_steps", "val_every")


def resume_config(cfg, explicit):
    """The config a resumed run uses: the stored one, with the run-length flags the user
    gave (`explicit`) on top. A flag that changes the model or diffusion is an error.
    Returns (config, path of the checkpoint); a fresh run returns (cfg, None)."""
    path = find_resume_checkpoint(cfg)
    if path is None:
        return cfg, None
    stored = TrainConfig.from_dict(read_checkpoint(path)["config"]).to_dict()
    current = cfg.to_dict()
    keys = model_keys(stored)
    clash = [k for k in keys if k in explicit and current[k] != stored[k]]
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
               (stored[k] != current[k] and k not in keys)]
    if ignored:
        print0(f"resume: keeping the run's stored {', '.join(sorted(ignored))}; "
               f"only {', '.join(RUN_LENGTH_KEYS)} can change on resume")
    return TrainConfig.from_dict(stored), path


@dataclass
class Progress:
    """Where a run stands and the best it has done: saved, field by field, at the top level
    of every checkpoint (older checkpoints read the same keys)."""
    epoch: int = 0                   # finished epochs
    batch: int = 0                   # batches trained of the next epoch (a mid-epoch save)
    step: int = 0                    # optimiser steps taken (skipped non-finite ones aside)
    best_iou: float = -1.0           # best EMA val IoU (best_iou.pt: within min_delta of it)
    best_iou_dice: Optional[list] = None  # [DDIM steps, val Dice] of the validation that
                                          # wrote best_iou.pt (reused by the step choice)
    best_mse: float = math.inf       # best EMA val MSE: best_mse.pt
    patience_iou: float = -1.0       # the val IoU the patience count last restarted at
    patience_step: int = 0           # ... and the step it restarted at
    val_iou: Optional[float] = None  # the last validation's scores
    val_mse: Optional[float] = None
    skipped_steps: int = 0           # non-finite steps skipped in all
    wall_seconds: float = 0.0        # the run's wall time so far (resumed segments summed)
    val_seconds: float = 0.0         # ... of which validation, pictures and plots
    stopped_early: bool = False      # on patience
    stopped_by_time: bool = False    # on --max-minutes
    sample_steps: Optional[int] = None        # DDIM steps that scored best on val at the end
    sample_steps_dice: Optional[list] = None  # ... [[steps, one-sample val Dice], ...]
    ensemble_steps: Optional[int] = None      # ... for an ensemble (train_utils.ensemble_steps)

    def record_validation(self, val_iou, val_mse, min_delta, val_dice=None, steps=None):
        """Fold one validation in; returns the best_*.pt files to write. `val_dice` at
        `steps` DDIM steps is kept with the weights best_iou.pt gets (best_iou_dice).

        best_iou.pt takes the latest weights whose val IoU is within min_delta of the best
        so far: every gain, and a tie within the noise min_delta stands for, where the later
        EMA weights have trained longer (on a flat val curve the first maximum can lie far
        before the end: lung-ct-64, seed 0, step 700 of 1600; nnU-Net predicts with its
        final weights by default). Its val IoU is never more than min_delta below the best.
        The patience count restarts only on a gain of more than min_delta over the IoU at
        its last restart, so a run whose IoU creeps up by less than min_delta per
        validation still stops, with its best model.
        """
        self.val_mse, self.val_iou = val_mse, val_iou
        saves = []
        if val_iou > self.patience_iou + min_delta:
            self.patience_iou, self.patience_step = val_iou, self.step
        self.best_iou = max(self.best_iou, val_iou)
        if val_iou >= self.best_iou - min_delta:
            self.best_iou_dice = None if val_dice is None else [steps, val_dice]
            self.sample_steps = self.sample_steps_dice = self.ensemble_steps = None
            # ... chosen for other weights
            saves.append("best_iou.pt")
        if val_mse < self.best_mse:
            self.best_mse = val_mse
            saves.append("best_mse.pt")
        return saves

    def set_position(self, epoch, done, batches_per_epoch):
        """Where the loader stands: `done` batches of (0-based) `epoch` trained."""
        self.epoch, self.batch = ((epoch + 1, 0) if done == batches_per_epoch else (epoch, done))

    def out_of_patience(self, cfg):
        """Stop early: past the minimum training, and `patience` steps without a gain."""
        return self.step >= cfg.min_steps and self.step - self.patience_step >= cfg.patience

    @classmethod
    def from_checkpoint(cls, state):
        fields = {f.name for f in dataclasses.fields(cls)}
        progress = cls(**{k: v for k, v in state.items() if k in fields})
        if "patience_iou" not in state:  # written before best and patience were separate
            progress.patience_iou = progress.best_iou
        if "patience_step" not in state:  # patience counted validations: start counting now
            progress.patience_step = progress.step
        return progress


# ------------------------------------------------------------------------ ranks
def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main():
    return rank() == 0


def print0(*args, **kwargs):
    """print on rank 0 only, so call sites never branch on rank."""
    if is_main():
        print(*args, **kwargs, flush=True)


def unwrap(model):
    """The plain nn.Module under DDP and torch.compile wrappers (no `module.` / `_orig_mod.`)."""
    while True:
        if hasattr(model, "module"):            # DistributedDataParallel
            model = model.module
        elif hasattr(model, "_orig_mod"):       # torch.compile
            model = model._orig_mod
        else:
            return model


# ---------------------------------------------------------------------- pictures
def save_images(path, image, truth, prediction, nrow=None):
    """One row per example: image | truth | prediction, all (B, 1 or 3, H, W) in [0, 1]."""
    panels = [x.detach().float().cpu() for x in (image, truth, prediction)]
    channels = max(x.shape[1] for x in panels)  # grey masks beside an RGB image become grey RGB
    image, truth, prediction = (x.expand(-1, channels, -1, -1) for x in panels)
    rows = torch.stack([image, truth, prediction], dim=1).flatten(0, 1)  # (3B, C, H, W)
    grid = make_grid(rows, nrow=nrow or 3, padding=2, pad_value=0.5)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return grid


# ------------------------------------------------------------------- checkpoints
def build_model_and_diffusion(config):
    """The backbone and Diffusion exactly as a run's config (a dict of plain types)
    describes. The UNet2D flags reach unet2d only; other backbones take their defaults."""
    name = config.get("model", "unet2d")
    opts = {}
    if name == "unet2d":
        opts = {k: tuple(config[k]) if isinstance(config[k], list) else config[k]
                for k in UNET_KEYS}
    self_condition = config.get("self_condition", False)
    num_classes = config.get("num_classes", 2)
    representation = config.get("representation", "onehot")
    m = mask_channels(num_classes, representation)
    model = build_model(name, in_channels=config["channels"] + m * (1 + self_condition),
                        out_channels=m, **opts)
    diffusion = Diffusion(config["timesteps"], schedule=config["schedule"],
                          prediction=config["prediction"], shift=config["schedule_shift"],
                          self_condition=self_condition,
                          timestep_sampling=config.get("timestep_sampling", "uniform"),
                          loss_weighting=config.get("loss_weighting", "none"),
                          min_snr_gamma=config.get("min_snr_gamma", 5.0),
                          num_classes=num_classes, representation=representation,
                          input_scaling=config.get("input_scaling", "none"),
                          time_floor=config.get("time_floor", 0.0))
    return model, diffusion


def stored_sample_steps(state, ensemble=1, diffusion=None):
    """The DDIM steps a finished run chose on its val split (a checkpoint dict), for
    `ensemble` samples per image: evaluate.py's default. `ensemble_steps` for K > 1 where
    stored, else `sample_steps`; for a checkpoint from before the choice (or a run stopped
    before it), 25, or the most the checkpoint's `diffusion` allows if fewer."""
    fallback = 25 if diffusion is None else min(25, diffusion.max_ddim_steps)
    return (ensemble > 1 and state.get("ensemble_steps")) or state.get("sample_steps") or fallback


def previous_checkpoint(path):
    """Where save_checkpoint(..., keep_previous=True) keeps the file it replaces."""
    path = Path(path)
    return path.with_name(f"{path.stem}_prev{path.suffix}")


def save_checkpoint(state, path, keep_previous=False):
    """Write `state` to a temporary file beside `path`, flush it to disk, then rename it into
    place, so a crash mid-write never leaves a truncated file under the real name. With
    keep_previous, the file being replaced survives as <name>_prev.pt until the next save."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous and path.exists():
        os.replace(path, previous_checkpoint(path))
    os.replace(tmp, path)


def check_finite(state_dict, what):
    """Refuse to save weights holding NaN or inf: a checkpoint is only useful when sound."""
    bad = [k for k, v in state_dict.items()
           if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"{what} holds non-finite values in {', '.join(bad[:3])}"
                                 f"{' ...' if len(bad) > 3 else ''}; not saving it")


def read_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True: tensors and plain types only, no code runs.
    Every failure becomes one CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the same user error
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot load checkpoint {path}: it is corrupt, truncated, or holds objects other "
            f"than tensors and plain types (refused for safety). Details: {first}") from None
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise CheckpointError(f"{path} is not a DDPM-v2 checkpoint (no 'config'/'model' keys)")
    version = state.get("format_version")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {version}; this code reads "
                              f"format {CHECKPOINT_VERSION}")
    return state


def check_model_config(stored, current, path):
    """Raise a clear error when a checkpoint's model/diffusion settings differ from ours."""
    stored = {**LATER_MODEL_KEYS, **stored}
    diffs = [f"{k}: checkpoint {stored.get(k)!r} vs now {current.get(k)!r}"
             for k in model_keys(stored) if _plain(stored.get(k)) != _plain(current.get(k))]
    if diffs:
        raise CheckpointError(f"{path} was trained with a different model or diffusion; "
                              f"drop these flags or start a new run folder: " + "; ".join(diffs))


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


# ----------------------------------------------------------- checkpoints of a run
def checkpoint_state(raw_model, ema, optimizer, scheduler, scaler, progress, cfg, adversary=None):
    """One dict, plain types and tensors only. Gathers every rank's RNG state (a collective:
    all ranks call it)."""
    check_finite(unwrap(raw_model).state_dict(), "the model")
    check_finite(ema.state_dict(), "the EMA model")
    if adversary is not None:
        check_finite(adversary.net.state_dict(), "the discriminator")
    rngs = [None] * world_size()
    if world_size() > 1:
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
        **dataclasses.asdict(progress),
        "adversary": adversary.state_dict() if adversary is not None else None,
        "rng": rngs,
        "config": cfg.to_dict(),
    }


def restore_checkpoint(path, cfg, raw_model, ema, optimizer, scheduler, scaler,
                       adversary=None):
    """Load a run's checkpoint into the freshly built training objects; returns its
    Progress and the RNG states it saved, one per rank."""
    state = read_checkpoint(path)
    check_model_config(state["config"], cfg.to_dict(), path)
    raw_model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:  # empty when the run had no fp16 scaler
        scaler.load_state_dict(state["scaler"])
    if adversary is not None:
        if state.get("adversary") is None:
            raise CheckpointError(f"{path} has no discriminator to resume")
        adversary.load_state_dict(state["adversary"])
    return Progress.from_checkpoint(state), state["rng"]


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


def load_checkpoint(path, map_location=None, weights="ema"):
    """Rebuild (model, diffusion, config) from a checkpoint, ready for a notebook:

        model, diffusion, config = load_checkpoint("trained_models/run/best_iou.pt")
        masks = diffusion.sample(model, images, steps=25)

    weights: "ema" (default, what the validation metrics measured) or "raw".
    config is the run's TrainConfig. The model is in eval mode on `map_location` (CPU
    when None).
    """
    state = read_checkpoint(path, map_location="cpu")
    try:
        config = TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its config does not match this code ({e})") from None
    if config.model not in MODELS:
        raise CheckpointError(
            f"{path} was trained with the backbone {config.model!r}, which is not registered "
            f"in this process (registered: {', '.join(sorted(MODELS))}). Register it first: "
            f"model.MODELS[{config.model!r}] = MyNet, then load the checkpoint")
    model, diffusion = build_model_and_diffusion(config.to_dict())
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    try:
        model.load_state_dict(state["ema" if weights == "ema" else "model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model its config describes "
                              f"({str(e).splitlines()[0]})") from None
    model.to(map_location or "cpu").eval()
    return model, diffusion, config


# ---------------------------------------------------------------------- metrics
def _surface(mask):
    """Boundary pixels (voxels) of a boolean 2-D (3-D) mask: the mask minus its erosion by
    the face-connected neighbourhood (4 in 2-D, 6 in 3-D)."""
    from scipy import ndimage
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure)


def _surface_distances(a, b, spacing):
    """Distance from each boundary pixel of `a` to the nearest boundary pixel of `b`."""
    from scipy import ndimage
    distance_to_b = ndimage.distance_transform_edt(~_surface(b), sampling=spacing)
    return distance_to_b[_surface(a)]


def mask_metrics(pred, truth, spacing=1.0, tolerance=2.0):
    """Overlap and boundary metrics of one (H, W) boolean prediction against the truth, or
    of one (X, Y, Z) volume (then `spacing` per axis, e.g. a NIfTI header's, gives mm).

    dice, iou, precision, recall: overlap (an empty prediction has precision 0 unless the
        truth is empty too).
    hd95: 95th percentile of the boundary distances in both directions pooled, in pixels
        times `spacing` (a float, or one per axis), as in MedPy.
    hd95_max: the larger of the two directed 95th percentiles, as MONAI's
        compute_hausdorff_distance(percentile=95): it reads higher than hd95 when one
        boundary strays further from the other than the other does from it.
    assd: average symmetric surface distance: the mean of the two directed mean distances.
    boundary_f1: F1 of boundary pixels that lie within `tolerance` (same units) of the other
        mask's boundary (Csurka et al. 2013).
    Empty cases: both empty -> every score 1 and distances 0. Exactly one empty -> dice,
    iou and boundary_f1 0, and hd95/assd NaN (no boundary to measure to): callers count
    these separately rather than averaging a made-up distance.
    """
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape or pred.ndim not in (2, 3):
        raise ValueError(f"mask_metrics wants two (H, W) or (X, Y, Z) masks, got {pred.shape} "
                         f"and {truth.shape}")
    tp = float((pred & truth).sum())
    n_pred, n_truth = float(pred.sum()), float(truth.sum())
    if n_pred == 0 and n_truth == 0:
        return dict(dice=1.0, iou=1.0, precision=1.0, recall=1.0, hd95=0.0, hd95_max=0.0,
                    assd=0.0, boundary_f1=1.0)
    scores = dict(dice=2 * tp / (n_pred + n_truth), iou=tp / (n_pred + n_truth - tp),
                  precision=tp / n_pred if n_pred else 0.0,
                  recall=tp / n_truth if n_truth else 0.0)
    if n_pred == 0 or n_truth == 0:
        return dict(scores, hd95=math.nan, hd95_max=math.nan, assd=math.nan, boundary_f1=0.0)
    d_pt = _surface_distances(pred, truth, spacing)      # pred boundary -> truth boundary
    d_tp = _surface_distances(truth, pred, spacing)
    both = np.concatenate([d_pt, d_tp])
    b_precision = float((d_pt <= tolerance).mean())
    b_recall = float((d_tp <= tolerance).mean())
    b_f1 = 2 * b_precision * b_recall / (b_precision + b_recall) if b_precision + b_recall else 0.0
    return dict(scores, hd95=float(np.percentile(both, 95)),
                hd95_max=float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))),
                assd=float((d_pt.mean() + d_tp.mean()) / 2), boundary_f1=b_f1)


def overlap_scores(pred, truth):
    """Batched Dice and IoU of boolean (B, ..., H, W) masks, shape (B,) each; empty pairs
    score 1. Cheap enough for the training loop and sweeps over thresholds."""
    pred, truth = pred.flatten(1), truth.flatten(1)
    inter = (pred & truth).sum(1).float()
    total = (pred.sum(1) + truth.sum(1)).float()
    union = total - inter
    dice = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return dice, iou


def class_overlap(pred, truth, num_classes=2):
    """Batched Dice and IoU of label maps (B, ..., H, W) holding class indices, shape (B,)
    each: per image, the mean over the foreground classes 1..K-1 of that class's overlap_scores
    (a class absent from both scores 1). K=2: the overlap of the foreground."""
    scores = [overlap_scores(pred == k, truth == k) for k in range(1, num_classes)]
    return (torch.stack([dice for dice, _ in scores]).mean(0),
            torch.stack([iou for _, iou in scores]).mean(0))


# -------------------------------------------------------------------- ensembles
FUSIONS = ("mean", "vote", "staple")


def fuse_samples(probs, method="mean", threshold=0.5):
    """Fuse S sampled masks per image.

    Binary: (B, S, H, W) foreground probabilities -> (B, 1, H, W) in [0, 1].
        mean:   the mean probability.
        vote:   the fraction of samples above `threshold` (above 0.5 = a strict majority).
        staple: STAPLE's posterior foreground probability (Warfield et al. 2004), treating
                each thresholded sample as a rater of unknown sensitivity and specificity.
    K classes: (B, S, K, H, W) class probabilities -> (B, K, H, W), a distribution per pixel.
        mean:   the mean class distribution (arg-max it for labels).
        vote:   the fraction of samples whose arg-max is each class (its arg-max is the
                per-pixel majority, ties to the lower class index).
        staple: refused (multi-label STAPLE is not implemented).
    """
    if method not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {method!r}")
    if probs.ndim == 5:
        if method == "mean":
            return probs.mean(1)
        if method == "vote":
            votes = F.one_hot(probs.argmax(2), probs.shape[2])          # (B, S, H, W, K)
            return votes.float().mean(1).permute(0, 3, 1, 2)
        raise ValueError("--fusion staple is binary STAPLE; for label maps of K > 2 classes "
                         "use --fusion mean or vote")
    if method == "mean":
        return probs.mean(1, keepdim=True)
    if method == "vote":
        return (probs > threshold).float().mean(1, keepdim=True)
    b, k, h, w = probs.shape
    decisions = (probs > threshold).reshape(b, k, h * w).cpu()  # a small EM: CPU, no syncs
    fused = torch.stack([staple(d) for d in decisions]).reshape(b, 1, h, w)
    return fused.to(device=probs.device, dtype=probs.dtype)


def staple(decisions, max_iter=100, tol=1e-7):
    """Binary STAPLE (Warfield, Zou & Wells 2004) by expectation-maximisation.

    decisions: (K, N) binary votes of K raters on N pixels. Each rater j has a sensitivity
    p_j and a specificity q_j; the prior of foreground is the mean vote. E-step: the
    posterior W_i that pixel i is foreground (eq. 14-16, in log space); M-step: p_j, q_j from
    W (eqs. 18-19). Returns W, shape (N,), float64.
    """
    votes = decisions.double()                                      # (K, N)
    eps = 1e-6
    prior = votes.mean().clamp(eps, 1 - eps)
    sensitivity = torch.full((votes.shape[0], 1), 0.99, dtype=torch.float64)
    specificity = torch.full((votes.shape[0], 1), 0.99, dtype=torch.float64)
    weights = votes.mean(0)
    for _ in range(max_iter):
        log_fg = torch.log(prior) + (votes * sensitivity.log()
                                     + (1 - votes) * (1 - sensitivity).log()).sum(0)
        log_bg = torch.log(1 - prior) + ((1 - votes) * specificity.log()
                                         + votes * (1 - specificity).log()).sum(0)
        new_weights = torch.sigmoid(log_fg - log_bg)                # (N,)
        sensitivity = ((new_weights * votes).sum(1, keepdim=True)
                       / new_weights.sum().clamp(min=eps)).clamp(eps, 1 - eps)
        specificity = (((1 - new_weights) * (1 - votes)).sum(1, keepdim=True)
                       / (1 - new_weights).sum().clamp(min=eps)).clamp(eps, 1 - eps)
        converged = (new_weights - weights).abs().max() < tol
        weights = new_weights
        if converged:
            break
    return weights


def uncertainty_maps(probs):
    """Per-pixel uncertainty of S samples -> dict of (B, 1, H, W) maps.

    Binary, (B, S, H, W): the variance of the sampled probabilities, and the binary entropy
    (bits, in [0, 1]) of their mean. K classes, (B, S, K, H, W): the variance averaged over
    classes, and the entropy of the mean class distribution normalised by log K (in [0, 1];
    for K=2 the same as the binary entropy in bits)."""
    if probs.ndim == 5:
        mean = probs.mean(1)                                               # (B, K, H, W)
        entropy = -torch.special.xlogy(mean, mean).sum(1, keepdim=True) / math.log(probs.shape[2])
        return {"variance": probs.var(1, unbiased=False).mean(1, keepdim=True),
                "entropy": entropy.clamp(0, 1)}
    mean = probs.mean(1, keepdim=True).clamp(0, 1)
    # xlogy: exactly 0 at 0 and 1 and symmetric in p <-> 1 - p (a clamp to [eps, 1 - eps]
    # in float32 is not, and would rank all-foreground pixels above all-background ones)
    entropy = -(torch.special.xlogy(mean, mean) + torch.special.xlogy(1 - mean, 1 - mean))
    entropy = entropy / math.log(2)
    return {"variance": probs.var(1, unbiased=False, keepdim=True), "entropy": entropy}


def calibration_bins(probs, labels, num_bins=15):
    """Counts for a reliability diagram of foreground probabilities: equal-width bins on
    [0, 1] (the last one closed), and per bin (pixels, sum of probabilities, sum of labels),
    each an array of length num_bins. Sums of these over batches are the whole set's."""
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    keep = np.isfinite(p)                      # a NaN probability belongs to no bin
    p, y = p[keep], y[keep]
    index = np.digitize(p, np.linspace(0, 1, num_bins + 1)[1:-1])   # 0 .. num_bins - 1
    return (np.bincount(index, minlength=num_bins).astype(np.float64),
            np.bincount(index, weights=p, minlength=num_bins),
            np.bincount(index, weights=y, minlength=num_bins))


def expected_calibration_error(counts, prob_sums, label_sums):
    """Expected calibration error of the foreground probability (class-wise ECE, Kull et
    al. 2019; the binning of Naeini et al. 2015) from `calibration_bins`: the pixel-weighted
    mean over bins of |observed foreground frequency - mean predicted probability|, i.e.
    sum_b (n_b / N) |mean label_b - mean prob_b|. 0 for a calibrated predictor."""
    total = counts.sum()
    return float(np.abs(label_sums - prob_sums).sum() / total) if total else math.nan


def auroc(scores, labels):
    """Area under the ROC curve of `scores` as a predictor of boolean `labels` (the
    Mann-Whitney U statistic, ties counted half); NaN when either class is absent."""
    from scipy.stats import rankdata
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
