"""Score a trained checkpoint on a labelled split, or predict masks for a folder of images.

    python evaluate.py --checkpoint trained_models/lung-ct-64-64/best_iou.pt \
        --data ../shared/data/lung-ct-64 --split test --steps 25 --ensemble 5 --fusion mean \
        --out trained_models/lung-ct-64-64/eval
    python evaluate.py --checkpoint CKPT                # the run's own data, its test split
    python evaluate.py --checkpoint CKPT --images DIR --out DIR     # masks for unlabelled images

With masks it writes to --out:
  metrics.json   mean and std over images of dice, iou, precision, recall, hd95 (pooled, as
                 MedPy), hd95_max (MONAI's), assd, boundary_f1; MedSegDiff-protocol
                 Dice/IoU (averaged over thresholds 0.1..0.9); how many images had empty
                 masks; ensemble uncertainty against pixel errors; calibration (ECE); the
                 settings, the checkpoint's step and config; seconds/image
  per_image.csv  one row per image
  reliability.png  the fused probability's calibration (ECE in metrics.json)
  sheet_NNN.png  rows of: image with truth (green) and prediction (red) outlines | truth |
                 fused prediction | uncertainty (entropy of the ensemble mean)
With --images it writes masks/<name>.png (at each image's own size: 0/255 for a binary mask,
class indices 0..K-1 for a label map) and uncertainty/<name>.png; for a folder of NIfTI
volumes, masks/<case>.nii.gz with the input's shape, affine and header (predict_volumes).
On nnU-Net's layout (dataset.json) rows are volumes: 3-D scores, distances in mm.

Label maps (a run of --num-classes K > 2): metrics.json's `metrics` is the mean over the
foreground classes, `per_class` each class's (keyed "1".."K-1"), per_image.csv has a
`<metric>_<k>` column per class, and the sheets colour each class.
"""
import argparse
import csv
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_segmentation_masks, make_grid, save_image
from tqdm.auto import tqdm

from DDPM import true_labels
from dataset import (FIT_MODES, IMAGE_EXTENSIONS, VOLUME_ENDINGS, DatasetError, fit_square,
                     image_to_tensor, intensity_to_unit, is_nnunet, load_split, read_array,
                     read_dataset_json, read_volume, stack_slices, volume_slices,
                     windowed_channels)
from utils import (FUSIONS, CheckpointError, auroc, calibration_bins,
                   expected_calibration_error, fuse_samples, load_checkpoint, mask_metrics,
                   overlap_scores, read_checkpoint, stored_sample_steps, uncertainty_maps)

METRICS = ("dice", "iou", "precision", "recall", "hd95", "hd95_max", "assd", "boundary_f1")
# class colours on the picture sheets of label maps: class k gets CLASS_COLOURS[k - 1]
CLASS_COLOURS = ("red", "lime", "blue", "yellow", "magenta", "cyan", "orange", "purple",
                 "brown", "pink", "olive", "teal", "navy", "maroon", "gold")
CALIBRATION_BINS = 15
PROTOCOL_THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(1, 10))


# ------------------------------------------------------------------ prediction
def prepare_model(model, device, compile=False):
    """Move to `device`; on CUDA use channels_last and optionally torch.compile (both make
    CPU convolutions slower, so they stay off there)."""
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        if compile:
            model = torch.compile(model)
    return model


def predict(model, diffusion, images, steps, ensemble=1, fusion="mean", eta=0.0,
            generator=None, amp=None, max_batch=None, mirror=False):
    """Sample `ensemble` masks per image and fuse them; with `mirror`, the members see the
    image as it is and flipped (Diffusion.sample).

    Returns the fused probabilities (binary: (B, 1, H, W) foreground; K classes: (B, K, H,
    W) class distributions), the samples (B, S, H, W) or (B, S, K, H, W), and the
    uncertainty maps (dict of (B, 1, H, W); see utils.uncertainty_maps)."""
    device = next(model.parameters()).device
    context = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
    with context:
        samples = diffusion.sample(model, images.to(device), steps=steps, eta=eta,
                                   generator=generator, num_samples=ensemble,
                                   max_batch=max_batch, mirror=mirror).float()
    if ensemble > 1:
        fused = fuse_samples(samples, fusion)
    else:
        fused = samples[:, 0] if samples.ndim == 5 else samples
    return fused, samples, uncertainty_maps(samples)


def mirror_setting(choice, config):
    """--mirror auto / on / off as a bool: auto mirrors where the run trained with flips."""
    return {"on": True, "off": False}.get(choice, config.trained_mirrored())


def predicted_labels(fused, num_classes):
    """Label maps (B, 1, H, W), long, from fused probabilities: threshold 0.5 (binary) or
    arg-max over classes."""
    if num_classes == 2:
        return (fused > 0.5).long()
    return fused.argmax(1, keepdim=True)


# ------------------------------------------------------------------ pictures
def outline(mask):
    """Boundary of a (N, H, W) boolean mask (the mask minus its 3x3 erosion)."""
    m = mask.float()[:, None]
    eroded = -F.max_pool2d(-m, 3, stride=1, padding=1)
    return (m - eroded)[:, 0] > 0


def picture_rows(images, truth, fused, uncertainty, min_size=128, num_classes=2):
    """Panels per image: overlay | truth | prediction | uncertainty, as (4B, 3, S, S) in
    [0, 1]. Binary: truth (green) and prediction (red) outlines on the image, the truth and
    the fused probability in grey. K classes (truth: label maps (B, 1, H, W); fused: class
    distributions): each class in its own colour (CLASS_COLOURS), prediction outlines on
    the image, truth and prediction filled."""
    scale = max(1, math.ceil(min_size / images.shape[-1]))
    up = lambda x: F.interpolate(x.float(), scale_factor=scale, mode="nearest")  # noqa: E731
    images, truth, fused, uncertainty = map(up, (images, truth, fused, uncertainty))
    grey = images.mean(1, keepdim=True) if images.shape[1] != 3 else images
    rgb = (grey.expand(-1, 3, -1, -1) * 255).round().to(torch.uint8)
    to_rgb = lambda x: x.expand(-1, 3, -1, -1)  # noqa: E731
    if num_classes == 2:
        pred = fused > 0.5
        overlays = []
        for i in range(rgb.shape[0]):
            lines = torch.cat([outline(truth[i] > 0.5), outline(pred[i])])      # (2, S, S)
            overlays.append(draw_segmentation_masks(rgb[i], lines, alpha=1.0,
                                                    colors=["lime", "red"]).float() / 255)
        middle = [to_rgb(truth), to_rgb(fused)]
    else:
        classes = torch.arange(1, num_classes)[:, None, None]
        colours = [CLASS_COLOURS[(k - 1) % len(CLASS_COLOURS)] for k in range(1, num_classes)]
        pred = fused.argmax(1)                                                   # (B, S, S)
        black = torch.zeros_like(rgb[0])
        overlays, truth_rgb, pred_rgb = [], [], []
        for i in range(rgb.shape[0]):
            p_masks, t_masks = pred[i] == classes, truth[i, 0].round().long() == classes
            overlays.append(draw_segmentation_masks(rgb[i], outline(p_masks), alpha=1.0,
                                                    colors=colours).float() / 255)
            truth_rgb.append(draw_segmentation_masks(black, t_masks, 1.0, colours).float() / 255)
            pred_rgb.append(draw_segmentation_masks(black, p_masks, 1.0, colours).float() / 255)
        middle = [torch.stack(truth_rgb), torch.stack(pred_rgb)]
    panels = torch.stack([torch.stack(overlays), *middle,
                          to_rgb(uncertainty.clamp(0, 1))], dim=1)           # (B, 4, 3, S, S)
    return panels.flatten(0, 1)


# ------------------------------------------------------------------ evaluation
def summarise(rows, names):
    """Mean and std over images of each metric; NaN distances are counted, not averaged."""
    out = {}
    for name in names:
        values = np.array([r[name] for r in rows], dtype=np.float64)
        finite = values[np.isfinite(values)]
        out[name] = {"mean": float(finite.mean()) if finite.size else math.nan,
                     "std": float(finite.std()) if finite.size else math.nan,
                     "n": int(finite.size)}
    return out


def _class_mean(values):
    """Mean of the finite values (a metric over the foreground classes), NaN if none."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def image_metrics(pred, truth, num_classes, spacing=1.0, tolerance=2.0):
    """Metrics of one image's (H, W) label maps: binary, mask_metrics of the foreground;
    K classes, per-class mask_metrics of classes 1..K-1 as `<metric>_<k>` and, under the
    plain names, their mean over those classes (distances over the classes that have one)."""
    if num_classes == 2:
        return mask_metrics(pred == 1, truth == 1, spacing, tolerance)
    per = {k: mask_metrics(pred == k, truth == k, spacing, tolerance)
           for k in range(1, num_classes)}
    row = {m: _class_mean([per[k][m] for k in per]) for m in METRICS}
    row.update({f"{m}_{k}": per[k][m] for k in per for m in METRICS})
    return row


def evaluate(model, diffusion, dataset, out, steps=25, ensemble=1, fusion="mean", eta=0.0,
             batch_size=16, seed=0, amp=None, spacing=1.0, tolerance=2.0, names=None,
             max_batch=None, sheet_rows=8, mirror=False):
    """Score every image of `dataset`; write metrics.json, per_image.csv, reliability.png
    and picture sheets to `out`; return the metrics dict. With K > 2 classes (from
    `diffusion`), `metrics` holds the mean over foreground classes of each image's scores
    and `per_class` each class's, keyed "1" .. "K-1"."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    num_classes = diffusion.num_classes
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    rows, protocol = [], {th: [[], []] for th in PROTOCOL_THRESHOLDS}
    errors_all, unc_all = [], []
    # calibration counts per class (binary: the foreground only): pixels, sum p, sum truth
    bins = [[np.zeros(CALIBRATION_BINS) for _ in range(3)]
            for _ in range(1 if num_classes == 2 else num_classes)]
    sampling_seconds, sheet, sheet_index = 0.0, [], 0
    by_volume, pred_slices = hasattr(dataset, "case_truth"), {}
    for image, mask in tqdm(loader, desc="evaluating"):
        start = time.perf_counter()
        fused, samples, unc = predict(model, diffusion, image, steps, ensemble, fusion, eta,
                                      generator, amp, max_batch, mirror)
        fused, entropy = fused.cpu(), unc["entropy"].cpu()
        sampling_seconds += time.perf_counter() - start
        truth = true_labels(mask, num_classes)                        # (B, 1, H, W)
        pred = predicted_labels(fused, num_classes)
        for i in range(image.shape[0]):
            if by_volume:   # kept to stack into the case's volume after the loop
                pred_slices[dataset.slices[len(rows)]] = pred[i].to(torch.uint8)
            row = {"name": names[len(rows)] if names else str(len(rows))}
            row.update(image_metrics(pred[i, 0].numpy(), truth[i, 0].numpy(), num_classes,
                                     spacing, tolerance))
            row.update(pred_pixels=int((pred[i] > 0).sum()), truth_pixels=int((truth[i] > 0).sum()),
                       uncertainty=float(entropy[i].mean()))
            rows.append(row)
        if num_classes == 2:
            for th in PROTOCOL_THRESHOLDS:
                dice, iou = overlap_scores(fused > th, truth > 0)
                protocol[th][0] += dice.tolist()
                protocol[th][1] += iou.tolist()
        wrong = (pred != truth)
        errors_all.append(wrong.flatten().numpy())
        per_class = ([(fused, truth > 0)] if num_classes == 2 else
                     [(fused[:, k], truth[:, 0] == k) for k in range(num_classes)])
        for totals, (p, y) in zip(bins, per_class):
            for total, part in zip(totals, calibration_bins(p.numpy(), y.numpy(),
                                                            CALIBRATION_BINS)):
                total += part
        unc_all.append(entropy.flatten().numpy())
        sheet.append(picture_rows(image, mask if num_classes == 2 else truth, fused, entropy,
                                  num_classes=num_classes))
        if sum(len(s) for s in sheet) >= 4 * sheet_rows:
            sheet_index = _write_sheet(out, torch.cat(sheet), sheet_rows, sheet_index)
            sheet = []
    if sheet:
        _write_sheet(out, torch.cat(sheet), sheet_rows, sheet_index)

    if by_volume:   # nnU-Net layout: one row per case, 3-D, in the header's units (mm)
        rows = volume_rows(dataset, pred_slices, rows, num_classes, tolerance)
    class_columns = [f"{m}_{k}" for k in range(1, num_classes) for m in METRICS
                     ] if num_classes > 2 else []
    with open(out / "per_image.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["name", *METRICS, *class_columns, "pred_pixels",
                                    "truth_pixels", "uncertainty"])
        writer.writeheader()
        writer.writerows(rows)

    errors = np.concatenate(errors_all)
    uncertainty = np.concatenate(unc_all)
    metrics = {
        "images": len(rows),
        **({"rows": "one per volume (case): 3-D scores, distances in the header's units (mm "
                    "for NIfTI)"} if by_volume else {}),
        "metrics": summarise(rows, METRICS),
        "empty_masks": {
            "prediction_empty_truth_not": sum(r["pred_pixels"] == 0 < r["truth_pixels"] for r in rows),
            "truth_empty_prediction_not": sum(r["truth_pixels"] == 0 < r["pred_pixels"] for r in rows),
            "both_empty": sum(r["pred_pixels"] == 0 == r["truth_pixels"] for r in rows),
            "note": "hd95/assd are NaN when exactly one of prediction and truth is empty: those "
                    "images are left out of the distance means (their 'n' is smaller) and "
                    "counted here. Both empty scores dice 1, iou 1, distances 0. For label "
                    "maps these counts are of any foreground, and an image's mean distance "
                    "is over the classes that have one (per_class counts each class's).",
        },
        "uncertainty": {
            "measure": ("binary entropy (bits) of the ensemble's mean probability"
                        if num_classes == 2 else
                        f"entropy of the ensemble's mean class distribution / log {num_classes}"),
            "mean_on_wrong_pixels": float(uncertainty[errors].mean()) if errors.any() else math.nan,
            "mean_on_right_pixels": float(uncertainty[~errors].mean()),
            "auroc_for_pixel_error": auroc(uncertainty, errors),
            "wrong_pixel_fraction": float(errors.mean()),
        },
        "calibration": calibration_summary(bins),
        "seconds_per_image": sampling_seconds / max(len(rows), 1),
        "settings": {"steps": steps, "ensemble": ensemble, "mirror": mirror,
                     "fusion": fusion, "eta": eta,
                     "seed": seed, "threshold": 0.5, "spacing": spacing,
                     "boundary_tolerance": tolerance, "batch_size": batch_size},
    }
    if num_classes == 2:
        metrics["medsegdiff_protocol"] = {
            "dice": float(np.mean([np.mean(v[0]) for v in protocol.values()])),
            "iou": float(np.mean([np.mean(v[1]) for v in protocol.values()])),
            "thresholds": list(PROTOCOL_THRESHOLDS),
            "note": "mean over images, then over thresholds, of the fused probability map "
                    "binarised at each threshold (MedSegDiff's reporting)",
        }
    else:
        metrics["per_class"] = {
            str(k): {m: v for m, v in zip(METRICS, summarise(
                rows, [f"{m}_{k}" for m in METRICS]).values())}
            for k in range(1, num_classes)}
        metrics["metrics_note"] = ("per image, the mean over the foreground classes 1..K-1 "
                                   "(distances over the classes that have one); per_class: "
                                   "each class on its own")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    try:   # best effort: the numbers are in metrics.json already
        reliability_diagram(metrics["calibration"], out / "reliability.png")
    except Exception as e:  # noqa: BLE001
        print(f"reliability.png not drawn: {type(e).__name__}: {e}", file=sys.stderr)
    return metrics


def volume_rows(dataset, pred_slices, slice_rows, num_classes, tolerance=2.0):
    """Per-case rows of an nnU-Net dataset (NnUNetDataset): each case's slice predictions,
    mapped back to the slice's stored size (fit undone, nearest neighbour) and stacked along
    its slice axis into a volume of the stored shape, scored in 3-D against the label file
    as stored, with the header's voxel spacing (mm for NIfTI, 1 for 2-D files)."""
    uncertainty = {}
    for (case, _), row in zip(dataset.slices, slice_rows):
        uncertainty.setdefault(case, []).append(row["uncertainty"])
    rows = []
    for case in dataset.case_names():
        truth, spacing = dataset.case_truth(case)
        h, w = dataset.slice_shape(case)
        slices = [_unfit(pred_slices[(case, k)], h, w, dataset.fit,
                         v2.InterpolationMode.NEAREST_EXACT).round().to(torch.uint8).numpy()
                  for k in range(len(volume_slices(truth, dataset.slice_axis)))]
        pred = stack_slices(slices, dataset.slice_axis, truth.ndim)
        row = {"name": case, **image_metrics(pred, truth, num_classes, spacing, tolerance)}
        row.update(pred_pixels=int((pred > 0).sum()), truth_pixels=int((truth > 0).sum()),
                   uncertainty=float(np.mean(uncertainty[case])))
        rows.append(row)
    return rows


def calibration_summary(bins):
    """ECE and the reliability table of the fused probabilities, per pixel. `bins` holds
    calibration_bins counts (pixels, sum of probabilities, sum of labels) per class: one
    entry, the foreground, for a binary mask; K for K classes, whose ECE is the class-wise
    ECE (Kull et al. 2019), the mean over classes of each class's, and whose table pools
    the classes."""
    counts, prob_sums, label_sums = (sum(part) for part in zip(*bins))
    edges = np.linspace(0, 1, len(counts) + 1)
    table = [{"from": float(lo), "to": float(hi), "pixels": int(n),
              "mean_probability": float(p / n) if n else None,
              "foreground_frequency": float(y / n) if n else None}
             for lo, hi, n, p, y in zip(edges[:-1], edges[1:], counts, prob_sums, label_sums)]
    what = ("foreground probability" if len(bins) == 1 else
            f"probability of each of the {len(bins)} classes (pooled in the table; ECE the mean "
            f"of the per-class ECEs)")
    return {"ece": float(np.mean([expected_calibration_error(*b) for b in bins])),
            "bins": table,
            "note": f"the fused {what} of every pixel against its truth, in "
                    f"{len(counts)} equal-width bins; ECE = sum over bins of (pixels in bin / "
                    "all pixels) x |observed frequency - mean probability|"}


def reliability_diagram(calibration, path):
    """reliability.png: observed foreground frequency against predicted probability per bin
    (the diagonal is perfect calibration), and how many pixels each bin holds."""
    from matplotlib.figure import Figure
    bins = [b for b in calibration["bins"] if b["pixels"]]
    centres = [(b["from"] + b["to"]) / 2 for b in calibration["bins"]]
    width = calibration["bins"][0]["to"] - calibration["bins"][0]["from"]
    fig = Figure(figsize=(5, 6))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    top.bar([(b["from"] + b["to"]) / 2 for b in bins], [b["foreground_frequency"] for b in bins],
            width=width * 0.9, color="tab:blue", alpha=0.7, label="foreground frequency")
    top.plot([b["mean_probability"] for b in bins], [b["foreground_frequency"] for b in bins],
             "o", color="tab:red", ms=3, label="bin mean")
    top.set(ylabel="foreground frequency", xlim=(0, 1), ylim=(0, 1),
            title=f"ECE {calibration['ece']:.4f}")
    top.legend(fontsize=8, loc="upper left")
    bottom.bar(centres, [max(b["pixels"], 1e-1) for b in calibration["bins"]], width=width * 0.9,
               color="tab:gray")
    bottom.set(yscale="log", xlabel="predicted foreground probability", ylabel="pixels")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _write_sheet(out, panels, rows_per_sheet, index):
    for start in range(0, panels.shape[0], 4 * rows_per_sheet):
        save_image(make_grid(panels[start:start + 4 * rows_per_sheet], nrow=4, padding=2,
                             pad_value=0.5), out / f"sheet_{index:03d}.png")
        index += 1
    return index


# ------------------------------------------------------------------ inference
def predict_folder(model, diffusion, config, folder, out, steps=25, ensemble=1,
                   fusion="mean", batch_size=16, seed=0, amp=None, max_batch=None, fit=None,
                   mirror=False):
    """Masks for every image in `folder` (no masks needed), written at each image's own size:
    the image is made square (`fit`, default the run's) and resized as in training, and the
    prediction is mapped back: resized and the padding cut off (pad), resized to the
    original sides (stretch), or resized into the centre square with the cropped-off
    border predicted background (crop)."""
    fit = fit or config.fit
    folder, out = Path(folder), Path(out)
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "uncertainty").mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for start in tqdm(range(0, len(paths), batch_size), desc="predicting"):
        batch, sizes = [], []
        for path in paths[start:start + batch_size]:
            image = image_to_tensor(*read_array(path), config.channels)        # (C, H, W)
            sizes.append(image.shape[-2:])
            empty = torch.zeros(1, *image.shape[-2:], dtype=torch.uint8)
            batch.append(fit_square(image, empty, config.image_size, fit)[0])
        fused, _, unc = predict(model, diffusion, torch.stack(batch), steps, ensemble, fusion,
                                generator=generator, amp=amp, max_batch=max_batch,
                                mirror=mirror)
        labels = predicted_labels(fused.cpu(), diffusion.num_classes)      # (B, 1, S, S)
        for path, (h, w), label, entropy in zip(paths[start:], sizes, labels,
                                                 unc["entropy"].cpu()):
            label = _unfit(label, h, w, fit, v2.InterpolationMode.NEAREST_EXACT)
            if diffusion.num_classes == 2:
                _save_png(label, out / "masks" / f"{path.stem}.png")          # 0 / 255
            else:                                                             # 0 .. K-1
                Image.fromarray(label.round().to(torch.uint8).numpy()).save(
                    out / "masks" / f"{path.stem}.png")
            _save_png(_unfit(entropy, h, w, fit, v2.InterpolationMode.BILINEAR),
                      out / "uncertainty" / f"{path.stem}.png")
    return len(paths)


def predict_volumes(model, diffusion, config, folder, out, steps=25, ensemble=1,
                    fusion="mean", batch_size=16, seed=0, amp=None, max_batch=None, fit=None,
                    mirror=False):
    """Label volumes for every NIfTI case in `folder`: `<case>_0000.nii.gz` (+ `_0001`, ...
    for more channels, nnU-Net's naming) or `<case>.nii.gz`. Each is read as training read
    it (the run's --window or percentiles, --slice-axis), predicted slice by slice, mapped
    back to the stored slice size and stacked; masks/<case><ending> keeps the input's shape,
    affine, header and file ending (uint8 class indices), uncertainty/<case><ending> the
    entropy (float32). Returns the number of cases."""
    try:
        import nibabel
    except ImportError:
        raise DatasetError(f"{folder} holds NIfTI volumes: writing them needs nibabel "
                           f"(pip install nibabel)") from None
    fit = fit or config.fit
    folder, out = Path(folder), Path(out)
    files = []
    for path in sorted(folder.iterdir()):
        ending = next((e for e in VOLUME_ENDINGS if path.name.endswith(e)), None)
        if ending is not None:
            files.append((path, ending, path.name[:-len(ending)]))
    # nnU-Net's naming when every file ends in _<4 digits>; else each file is a case
    nnunet = all(len(stem.rpartition("_")[2]) == 4 and stem.rpartition("_")[2].isdigit()
                 and stem.rpartition("_")[0] for _, _, stem in files)
    cases = {}
    for path, ending, stem in files:
        case, channel = stem.rpartition("_")[::2] if nnunet else (stem, "0000")
        cases.setdefault(case, {})[int(channel)] = (path, ending)
    for sub in ("masks", "uncertainty"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    window = tuple(config.window) or None
    names = (read_dataset_json(config.data)["channels"] if is_nnunet(config.data)
             else ["CT"] * config.channels)    # without dataset.json: --window on every channel
    windowed = windowed_channels(names, window)
    for case, files in tqdm(sorted(cases.items()), desc="predicting"):
        if sorted(files) != list(range(config.channels)):
            raise DatasetError(f"{folder}: case {case} has channel file(s) "
                               f"{sorted(files)}; the model takes {config.channels}")
        volumes = [read_volume(files[c][0]) for c in range(config.channels)]
        first = volumes[0][3]
        stack = [volume_slices(intensity_to_unit(v[0], window if w else None), config.slice_axis)
                 for v, w in zip(volumes, windowed)]
        shape = volumes[0][0].shape
        odd = next((files[c][0] for c, v in enumerate(volumes) if v[0].shape != shape), None)
        if odd is not None:
            raise DatasetError(f"{odd} has another shape than {files[0][0]} ({shape})")
        h, w = [n for i, n in enumerate(shape) if len(shape) == 2
                or i != config.slice_axis % len(shape)]
        labels, entropy = [], []
        for start in range(0, len(stack[0]), batch_size):
            batch = []
            for k in range(start, min(start + batch_size, len(stack[0]))):
                image = torch.from_numpy(np.stack([c[k] for c in stack]).astype(np.float32))
                empty = torch.zeros(1, h, w, dtype=torch.uint8)
                batch.append(fit_square(image, empty, config.image_size, fit)[0])
            fused, _, unc = predict(model, diffusion, torch.stack(batch), steps, ensemble,
                                    fusion, generator=generator, amp=amp, max_batch=max_batch,
                                    mirror=mirror)
            for label, ent in zip(predicted_labels(fused.cpu(), diffusion.num_classes),
                                  unc["entropy"].cpu()):
                labels.append(_unfit(label, h, w, fit, v2.InterpolationMode.NEAREST_EXACT
                                     ).round().to(torch.uint8).numpy())
                entropy.append(_unfit(ent, h, w, fit, v2.InterpolationMode.BILINEAR).numpy())
        ending = files[0][1]
        for sub, slices, dtype in (("masks", labels, np.uint8), ("uncertainty", entropy,
                                                                  np.float32)):
            array = stack_slices(slices, config.slice_axis, len(shape)).astype(dtype)
            array = array.reshape(first.shape)          # e.g. a (X, Y, Z, 1) input
            header = first.header.copy()
            header.set_data_dtype(dtype)
            header["cal_min"], header["cal_max"] = 0, float(array.max())   # not the CT's
            nibabel.save(type(first)(array, first.affine, header), out / sub / f"{case}{ending}")
    return len(cases)


def _unfit(square, h, w, fit, interpolation):
    """Undo fit_square: the (1, S, S) map -> (h, w) on the original picture's pixels."""
    square = square.float()
    if fit == "stretch":
        return TF.resize(square, [h, w], interpolation=interpolation)[0]
    if fit == "crop":   # the centre square was seen; the border is predicted background
        side = min(h, w)
        full = torch.zeros(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        full[top:top + side, left:left + side] = TF.resize(
            square, [side, side], interpolation=interpolation)[0]
        return full
    side = max(h, w)
    full = TF.resize(square, [side, side], interpolation=interpolation)
    top, left = (side - h) // 2, (side - w) // 2
    return full[0, top:top + h, left:left + w]


def _save_png(array, path):
    Image.fromarray((array.clamp(0, 1) * 255).round().to(torch.uint8).numpy()).save(path)


# ------------------------------------------------------------------ command line
def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a .pt file written by main.py")
    parser.add_argument("--data", help="image/mask folder to score; default: the "
                                       "checkpoint's own data (the synthetic set if none)")
    parser.add_argument("--split", default="test",
                        help="split to score: test, val, train, or a folder under --data; on "
                             "a flat folder and the synthetic set, the seeded split training "
                             "held back")
    parser.add_argument("--images", help="folder of images without masks: write predictions")
    parser.add_argument("--out", help="folder for the results; default: eval-<checkpoint "
                                      "name>/ (predict-<name>/ with --images) beside it")
    parser.add_argument("--steps", type=int, default=None,
                        help="DDIM steps; the diffusion's T (e.g. 1000) = full ancestral "
                             "DDPM; default: the count the checkpoint's run chose on its val "
                             "split for one sample, or for an ensemble (which needs 2 or more "
                             "when one step gives K equal samples); 25 without one")
    parser.add_argument("--ensemble", type=int, default=5, help="samples per image")
    parser.add_argument("--mirror", default="auto", choices=("auto", "on", "off"),
                        help="ensemble members 2, 3, 4 see the image flipped left-right, "
                             "up-down, both (5 as 1, 6 as 2, ...); auto: on when the run "
                             "trained on folder data with flips (binary masks by default)")
    parser.add_argument("--fusion", default="mean", choices=FUSIONS)
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 deterministic)")
    parser.add_argument("--weights", default="ema", choices=("ema", "raw"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=None,
                        help="largest batch of B*K samples per pass (memory)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"),
                        help="autocast while sampling")
    parser.add_argument("--compile", action="store_true", help="torch.compile (CUDA)")
    parser.add_argument("--spacing", type=float, default=1.0, help="pixel size for distances")
    parser.add_argument("--tolerance", type=float, default=2.0,
                        help="boundary F1 tolerance, in the units of --spacing")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    data = parser.add_argument_group("reading masks (default: as the checkpoint's run did)")
    data.add_argument("--mask-values", type=int, nargs="*",
                      help="stored mask values that are foreground; the flag alone, without "
                           "values, thresholds at --mask-threshold instead")
    data.add_argument("--class-values", type=int, nargs="+",
                      help="label maps: the stored value of each class, in class order")
    data.add_argument("--mask-threshold", type=float,
                      help="foreground where the mask is >= this fraction of full scale")
    data.add_argument("--mask-suffix", help="ending of mask file names after the image's name")
    data.add_argument("--allow-soft-masks", action=argparse.BooleanOptionalAction,
                      help="accept soft masks, thresholded at --mask-threshold")
    data.add_argument("--fit", choices=FIT_MODES, help="non-square images: pad, stretch, crop")
    data.add_argument("--val-fraction", type=float,
                      help="fraction of train held back as val (no val split)")
    data.add_argument("--test-fraction", type=float,
                      help="fraction held back as test from a flat images/ + masks/ folder")
    return parser


def scored_dataset(config, args):
    """The labelled images to score: --split of --data (default the run's own data), read
    with the run's mask settings unless a flag overrides them, and its seeded held-back
    splits for the synthetic set and flat folders."""
    data = args.data if args.data is not None else config.data
    options = {}
    if data is not None:
        values = list(config.mask_values) if args.mask_values is None else args.mask_values
        options = dict(mask_values=values or None,
                       mask_threshold=_given(args.mask_threshold, config.mask_threshold),
                       mask_suffix=_given(args.mask_suffix, config.mask_suffix),
                       allow_soft_masks=_given(args.allow_soft_masks, config.allow_soft_masks),
                       fit=_given(args.fit, config.fit), num_classes=config.num_classes,
                       class_values=(args.class_values or list(config.class_values)
                                     or None),
                       slice_axis=config.slice_axis, window=tuple(config.window) or None)
    return load_split(data, args.split, image_size=config.image_size, channels=config.channels,
                      val_fraction=_given(args.val_fraction, config.val_fraction),
                      test_fraction=_given(args.test_fraction, config.test_fraction),
                      seed=config.seed,
                      synthetic_sizes=(config.synthetic_train, config.synthetic_val,
                                       config.synthetic_test), **options)


def _given(flag, stored):
    return stored if flag is None else flag


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data is not None and args.images is not None:
        parser.error("give at most one of --data (with masks) and --images (without)")
    checkpoint = Path(args.checkpoint)
    out = Path(args.out or checkpoint.parent / (f"predict-{checkpoint.stem}" if args.images
                                                else f"eval-{checkpoint.stem}"))
    try:
        model, diffusion, config = load_checkpoint(args.checkpoint, weights=args.weights)
        state = read_checkpoint(args.checkpoint)
        if diffusion.num_classes > 2 and args.fusion == "staple":
            raise ValueError("--fusion staple is binary STAPLE; this checkpoint segments "
                             f"{diffusion.num_classes} classes: use --fusion mean or vote")
        if args.steps is None:
            args.steps = stored_sample_steps(state, args.ensemble, diffusion)
        device = torch.device(args.device)
        model = prepare_model(model, device, args.compile)
        amp = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
        common = dict(steps=args.steps, ensemble=args.ensemble, fusion=args.fusion,
                      batch_size=args.batch_size, seed=args.seed, amp=amp,
                      max_batch=args.max_batch,
                      mirror=mirror_setting(args.mirror, config))
        if args.images:
            volumes = any(p.name.endswith(VOLUME_ENDINGS) for p in Path(args.images).iterdir())
            n = (predict_volumes if volumes else predict_folder)(
                model, diffusion, config, args.images, out, fit=args.fit, **common)
            print(f"wrote {n} masks to {out / 'masks'}")
            return None
        dataset = scored_dataset(config, args)
        metrics = evaluate(model, diffusion, dataset, out, eta=args.eta,
                           spacing=args.spacing, tolerance=args.tolerance,
                           names=dataset.names, **common)
    except (CheckpointError, DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    metrics["data"] = {"data": args.data if args.data is not None else config.data,
                       "split": args.split}
    metrics["checkpoint"] = {"path": str(args.checkpoint), "weights": args.weights,
                             "step": state["step"], "epoch": state["epoch"],
                             "config": state["config"]}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    m = metrics["metrics"]
    print(f"{metrics['images']} images: dice {m['dice']['mean']:.4f}  iou {m['iou']['mean']:.4f}  "
          f"hd95 {m['hd95']['mean']:.2f}  assd {m['assd']['mean']:.2f}  "
          f"{metrics['seconds_per_image']:.3f} s/image  -> {out}")
    if "per_class" in metrics:
        print("per class: " + "  ".join(f"{k}: dice {c['dice']['mean']:.4f}"
                                        for k, c in metrics["per_class"].items()))
    return metrics


if __name__ == "__main__":
    main()
