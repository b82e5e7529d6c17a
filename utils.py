"""Small helpers: rank-aware printing, pictures, checkpoint I/O, model rebuilding."""
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torchvision.utils import make_grid, save_image

from DDPM import Diffusion
from model import UNet2D

CHECKPOINT_VERSION = 1

# Config fields that decide the network's shape or the diffusion process: a checkpoint can
# only be loaded, or a run resumed, when these match.
MODEL_KEYS = ("channels", "base_channels", "channel_mults", "num_res_blocks",
              "attention_resolutions", "dropout", "timesteps", "schedule", "prediction")


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


def barrier():
    if world_size() > 1:
        dist.barrier()


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
                          prediction=config["prediction"])
    return model, diffusion


def save_checkpoint(state, path):
    """Write `state` to a temporary file beside `path`, then rename it into place, so a
    crash mid-write never leaves a truncated file under the real name."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


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
