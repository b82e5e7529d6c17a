"""Small helpers: rank-aware printing, pictures, checkpoint I/O, model rebuilding."""
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torchvision.utils import make_grid, save_image

from DDPM import Diffusion
from model import UNet2D

CHECKPOINT_VERSION = 1

# Config fields that decide the network's shape or the diffusion process: a checkpoint can
# only be loaded, or a run resumed, when these match.
MODEL_KEYS = ("channels", "base_channels", "channel_mults", "num_res_blocks",
              "attention_resolutions", "dropout", "timesteps", "schedule", "schedule_shift",
              "prediction")
# model keys added after checkpoints were already being written: what an older one meant
LATER_MODEL_KEYS = {"schedule_shift": 1.0}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, unsafe, or made for another model."""


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
    """UNet2D and Diffusion exactly as a run's config (a dict of plain types) describes."""
    model = UNet2D(in_channels=config["channels"] + 1, out_channels=1,
                   base_channels=config["base_channels"],
                   channel_mults=tuple(config["channel_mults"]),
                   num_res_blocks=config["num_res_blocks"],
                   attention_resolutions=tuple(config["attention_resolutions"]),
                   dropout=config["dropout"])
    diffusion = Diffusion(config["timesteps"], schedule=config["schedule"],
                          prediction=config["prediction"],
                          shift=config["schedule_shift"])
    return model, diffusion


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
             for k in MODEL_KEYS if _plain(stored.get(k)) != _plain(current.get(k))]
    if diffs:
        raise CheckpointError(f"{path} was trained with a different model or diffusion; "
                              f"drop these flags or start a new run folder: " + "; ".join(diffs))


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def load_checkpoint(path, map_location=None, weights="ema"):
    """Rebuild (model, diffusion, config) from a checkpoint, ready for a notebook:

        model, diffusion, config = load_checkpoint("trained_models/run/best_iou.pt")
        masks = diffusion.sample(model, images, steps=25)

    weights: "ema" (default, what the validation metrics measured) or "raw".
    config is the run's TrainConfig. The model is in eval mode on `map_location` (CPU
    when None).
    """
    from train_utils import TrainConfig  # train_utils imports this module

    state = read_checkpoint(path, map_location="cpu")
    try:
        config = TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its config does not match this code ({e})") from None
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
    """Boundary pixels of a boolean mask: the mask minus its 4-connected erosion."""
    from scipy import ndimage
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1))


def _surface_distances(a, b, spacing):
    """Distance from each boundary pixel of `a` to the nearest boundary pixel of `b`."""
    from scipy import ndimage
    distance_to_b = ndimage.distance_transform_edt(~_surface(b), sampling=spacing)
    return distance_to_b[_surface(a)]


def mask_metrics(pred, truth, spacing=1.0, tolerance=2.0):
    """Overlap and boundary metrics of one (H, W) boolean prediction against the truth.

    dice, iou, precision, recall: overlap (an empty prediction has precision 0 unless the
        truth is empty too).
    hd95: 95th percentile of the boundary distances in both directions pooled, in pixels
        times `spacing` (a float, or (row, col) spacing), as in MedPy.
    assd: average symmetric surface distance: the mean of the two directed mean distances.
    boundary_f1: F1 of boundary pixels that lie within `tolerance` (same units) of the other
        mask's boundary (Csurka et al. 2013).
    Empty cases: both empty -> every score 1 and distances 0. Exactly one empty -> dice,
    iou and boundary_f1 0, and hd95/assd NaN (no boundary to measure to): callers count
    these separately rather than averaging a made-up distance.
    """
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape or pred.ndim != 2:
        raise ValueError(f"mask_metrics wants two (H, W) masks, got {pred.shape} and {truth.shape}")
    tp = float((pred & truth).sum())
    n_pred, n_truth = float(pred.sum()), float(truth.sum())
    if n_pred == 0 and n_truth == 0:
        return dict(dice=1.0, iou=1.0, precision=1.0, recall=1.0, hd95=0.0, assd=0.0,
                    boundary_f1=1.0)
    scores = dict(dice=2 * tp / (n_pred + n_truth), iou=tp / (n_pred + n_truth - tp),
                  precision=tp / n_pred if n_pred else 0.0,
                  recall=tp / n_truth if n_truth else 0.0)
    if n_pred == 0 or n_truth == 0:
        return dict(scores, hd95=math.nan, assd=math.nan, boundary_f1=0.0)
    d_pt = _surface_distances(pred, truth, spacing)      # pred boundary -> truth boundary
    d_tp = _surface_distances(truth, pred, spacing)
    both = np.concatenate([d_pt, d_tp])
    b_precision = float((d_pt <= tolerance).mean())
    b_recall = float((d_tp <= tolerance).mean())
    b_f1 = 2 * b_precision * b_recall / (b_precision + b_recall) if b_precision + b_recall else 0.0
    return dict(scores, hd95=float(np.percentile(both, 95)),
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


# -------------------------------------------------------------------- ensembles
FUSIONS = ("mean", "vote", "staple")


def fuse_samples(probs, method="mean", threshold=0.5):
    """Fuse K sampled masks per image, (B, K, H, W) probabilities -> (B, 1, H, W) in [0, 1].

    mean:   the mean probability.
    vote:   the fraction of samples above `threshold` (above 0.5 = a strict majority).
    staple: STAPLE's posterior foreground probability (Warfield et al. 2004), treating each
            thresholded sample as a rater of unknown sensitivity and specificity.
    """
    if method == "mean":
        return probs.mean(1, keepdim=True)
    if method == "vote":
        return (probs > threshold).float().mean(1, keepdim=True)
    if method == "staple":
        b, k, h, w = probs.shape
        decisions = (probs > threshold).reshape(b, k, h * w).cpu()  # a small EM: CPU, no syncs
        fused = torch.stack([staple(d) for d in decisions]).reshape(b, 1, h, w)
        return fused.to(device=probs.device, dtype=probs.dtype)
    raise ValueError(f"fusion must be one of {FUSIONS}, got {method!r}")


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
    """Per-pixel uncertainty of K samples, (B, K, H, W) -> dict of (B, 1, H, W) maps:
    variance of the sampled probabilities, and the binary entropy (bits, in [0, 1]) of
    their mean."""
    mean = probs.mean(1, keepdim=True).clamp(1e-6, 1 - 1e-6)
    entropy = -(mean * mean.log2() + (1 - mean) * (1 - mean).log2())
    return {"variance": probs.var(1, unbiased=False, keepdim=True), "entropy": entropy}


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
