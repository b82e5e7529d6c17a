"""DDPM-v2 against a deterministic U-Net with the same backbone, data, seed and minutes.

    python benchmarks/bench_quality.py --data ../shared/data/lung-ct-64 --minutes 10 --image-size 64
    python benchmarks/bench_quality.py --data ../shared/data/jsrt-lungs --minutes 10 --image-size 128

DDPM-v2: `python main.py --max-minutes M` with the default config plus --flags and
--ddpm-flags; best_iou.pt (EMA) is scored by evaluate.evaluate with one sample and a K=5
ensemble (mean fusion; members mirrored as evaluate.py's --mirror auto does: on for a
run trained with flips), sampled with the DDIM step counts the run chose on its val split
at its end for one sample and for an ensemble (as evaluate.py does), or with --steps:
given several, e.g. `--steps 1 5 25`, the counts are chosen on the validation split here
as a run chooses them (train_utils.fewest_good_steps, ensemble_steps). The ensemble's
uncertainty (pixel-error AUROC, entropy on wrong and right pixels) and calibration (ECE)
are reported beside its Dice; evaluate.py's files for both rows land under --out, the
U-Net's weights and per_image.csv under --out/unet. Each DDPM-v2 row is also compared with
the U-Net image by image: the mean Dice difference with a 95% bootstrap interval over the
test images, the images each side wins, and DDPM-v2's worst image (`paired_difference`).
Baseline: the same UNet2D without the noisy-mask input (t fixed at 0), trained on the same
augmented loader with BCE + soft Dice (label maps of --num-classes K > 2: cross-entropy +
soft Dice over the foreground classes, K output channels) for the same wall-clock minutes,
with the same EMA and the same --flags (batch size, learning rate, width, ...); the EMA
weights of its best validation Dice are scored. Both on the test split, threshold 0.5 (or
arg-max); for K > 2 Dice is the mean over foreground classes, with each class's beside it.
Where DDPM-v2's ensemble is mirrored, the U-Net is also scored with its probabilities
averaged over the four views, equally weighted ("reference: U-Net, mirrored"; DDPM-v2's
K=5 sees the unflipped image twice), so the share of a lead that test-time mirroring alone
would give a U-Net is on the table; the targets compare with the plain U-Net.

The baseline trains in fp32 on the CPU: the comparison is meant for a CPU machine. On a GPU
box, hide the GPU (CUDA_VISIBLE_DEVICES=) or DDPM-v2 gets it and the baseline does not.
Each bench_quality run needs its own --out (main.py refuses a folder that holds a run);
--reuse-ddpm scores the DDPM-v2 run already in --out/ddpm (one that ended: its last.pt says
why it stopped) instead of training it again, e.g. after the baseline was interrupted.
--unet-from RUN scores the U-Net another bench_quality run trained (RUN/unet, same data,
size, seed, minutes and baseline settings) instead of training one: a DDPM-v2 variant
(--ddpm-flags) against the same U-Net, at half the wall time; results.json names the
U-Net's run. The two halves then had their minutes at different times, and a machine whose
speed drifts gives them different step counts (494 to 902 DDPM-v2 steps in 10 minutes at
128 px on the project's CPU machine in one session): compare DDPM-v2 variants with it at
equal steps (seed_summary.py --against), and DDPM-v2 with the U-Net without it.
"""
import argparse
import csv
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import main as launcher  # noqa: E402
from DDPM import MIRROR_VIEWS, one_hot_labels, true_labels  # noqa: E402
from dataset import build_datasets, load_split, make_loader, set_epoch  # noqa: E402
from evaluate import evaluate, image_metrics, predict, predicted_labels  # noqa: E402
from model import UNet2D  # noqa: E402
from train_utils import (EMA, dataset_options, ensemble_steps, fewest_good_steps,  # noqa: E402
                         soft_dice_loss)
from utils import (TrainConfig, build_model_and_diffusion, class_overlap,  # noqa: E402
                   load_checkpoint, model_keys, read_checkpoint, seed_everything,
                   stored_sample_steps)

# main.py flags the benchmark sets itself, for both models
OWN_FLAGS = ("--data", "--image-size", "--seed", "--out", "--max-minutes", "--resume")


class Deterministic(torch.nn.Module):
    """UNet2D as a plain segmenter: the image in, mask logits out, t fixed at 0."""

    def __init__(self, cfg):
        super().__init__()
        self.unet = UNet2D(in_channels=cfg.channels,
                           out_channels=1 if cfg.num_classes == 2 else cfg.num_classes,
                           base_channels=cfg.base_channels, channel_mults=cfg.channel_mults,
                           num_res_blocks=cfg.num_res_blocks,
                           attention_resolutions=cfg.attention_resolutions, dropout=cfg.dropout)

    def forward(self, image):
        return self.unet(image, torch.zeros(image.shape[0], dtype=torch.long, device=image.device))


def train_baseline(cfg, minutes):
    """Train for `minutes` of wall time; return the EMA model at its best val Dice."""
    seed_everything(cfg.seed)
    data = build_datasets(cfg.data, image_size=cfg.image_size, channels=cfg.channels,
                          val_fraction=cfg.val_fraction, seed=cfg.seed, augment=cfg.augment,
                          **dataset_options(cfg))
    loader = make_loader(data["train"], cfg.batch_size, train=True, seed=cfg.seed)
    val = torch.utils.data.DataLoader(data["val"], batch_size=64)
    model = Deterministic(cfg)
    ema = EMA(model, cfg.ema_decay, cfg.ema_warmup)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1)))
    best_dice, best_state, step, epoch, history = -1.0, None, 0, 0, []
    start = time.time()
    while time.time() - start < 60 * minutes:
        set_epoch(loader, epoch)
        model.train()
        for image, mask in loader:
            if time.time() - start > 60 * minutes:
                break
            loss = baseline_loss(model(image), mask, cfg.num_classes)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            ema.update(model, step)
        epoch += 1
        with torch.no_grad():
            overlaps = [class_overlap(labels(ema.model(image), cfg.num_classes),
                                      true_labels(mask, cfg.num_classes), cfg.num_classes)
                        for image, mask in val]     # (Dice, IoU) per val batch
        dice, iou = (torch.cat(scores).mean().item() for scores in zip(*overlaps))
        history.append([step, dice, iou])
        if dice > best_dice:
            best_dice = dice
            best_state = {k: v.clone() for k, v in ema.model.state_dict().items()}
    ema.model.load_state_dict(best_state)
    return ema.model, {"epochs": epoch, "steps": step, "best_val_dice": best_dice,
                       "val_history": history}   # [step, val Dice, val IoU] per epoch


# the TrainConfig fields train_baseline reads (with dataset_options'); a reused U-Net must
# match them
BASELINE_KEYS = ("data", "image_size", "channels", "val_fraction", "seed", "augment",
                 "batch_size", "lr", "weight_decay", "warmup_steps", "grad_clip", "ema_decay",
                 "ema_warmup", "num_classes", "base_channels", "channel_mults",
                 "num_res_blocks", "attention_resolutions", "dropout")


def read_baseline(run):
    """The dict an earlier bench_quality run saved as run/unet/best_val_dice.pt."""
    return torch.load(run / "unet" / "best_val_dice.pt", map_location="cpu", weights_only=False)


def baseline_model(saved, cfg=None):
    """The U-Net of a read_baseline dict, in eval mode (built from its own config by default)."""
    model = Deterministic(cfg or TrainConfig.from_dict(saved["config"]))
    model.load_state_dict(saved["unet"] if "unet" in saved else saved["model"])  # older key
    return model.eval()


def load_baseline(run, cfg, minutes):
    """The U-Net an earlier bench_quality run trained (run/unet/best_val_dice.pt) and its
    training info, after checking it was trained as train_baseline(cfg, minutes) would."""
    saved = read_baseline(run)
    stored = TrainConfig.from_dict(saved["config"])
    differ = [k for k in BASELINE_KEYS if getattr(stored, k) != getattr(cfg, k)]
    differ += [k for k, v in dataset_options(cfg).items() if dataset_options(stored)[k] != v]
    report = run / "results.json"
    ran = json.loads(report.read_text())["minutes"] if report.exists() else None
    if ran != minutes:
        differ.append(f"minutes ({ran})")
    if differ:
        sys.exit(f"--unet-from: the U-Net in {run / 'unet'} differs in {', '.join(differ)}")
    model = baseline_model(saved, cfg)
    print(f"reusing the U-Net of {run}: {saved['steps']} steps")
    return model, {k: v for k, v in saved.items() if k not in ("unet", "model", "config", "kind")}


def baseline_loss(logits, mask, num_classes):
    """BCE + soft Dice (binary), or cross-entropy + soft Dice over the foreground classes."""
    if num_classes == 2:
        return (F.binary_cross_entropy_with_logits(logits, mask)
                + soft_dice_loss(torch.sigmoid(logits), mask).mean())
    target = true_labels(mask, num_classes)                              # (B, 1, H, W)
    one_hot = one_hot_labels(target, num_classes)
    return (F.cross_entropy(logits, target[:, 0])
            + soft_dice_loss(logits.softmax(1)[:, 1:], one_hot[:, 1:]).mean())


def labels(logits, num_classes):
    """(B, 1, H, W) label maps from the baseline's logits."""
    return (logits > 0).long() if num_classes == 2 else logits.argmax(1, keepdim=True)


def mirrored_labels(baseline, image, num_classes):
    """The baseline's label maps from its class probabilities averaged over MIRROR_VIEWS
    (each view's prediction flipped back)."""
    probs = 0.0
    for axes in MIRROR_VIEWS:
        logits = baseline(image.flip(axes) if axes else image)
        p = torch.sigmoid(logits) if num_classes == 2 else logits.softmax(1)
        probs = probs + (p.flip(axes) if axes else p)
    probs = probs / len(MIRROR_VIEWS)
    return (probs > 0.5).long() if num_classes == 2 else probs.argmax(1, keepdim=True)


def score(predict_fn, test, num_classes=2, batch_size=32, rows=None):
    """Mean over test images of Dice, IoU, HD95 (each the foreground-class mean), and
    each class's Dice when K > 2. predict_fn: images -> (B, 1, H, W) label maps. Pass a
    list as `rows` to get each image's metrics appended to it (in the split's order)."""
    rows = [] if rows is None else rows
    for i in range(0, len(test), batch_size):
        image, mask = map(torch.stack, zip(*[test[j] for j in range(i, min(i + batch_size, len(test)))]))
        pred = predict_fn(image)
        truth = true_labels(mask, num_classes)
        rows += [image_metrics(p[0].numpy(), m[0].numpy(), num_classes)
                 for p, m in zip(pred, truth)]
    mean = lambda k: float(np.nanmean([r[k] for r in rows]))  # noqa: E731
    result = {"dice": mean("dice"), "iou": mean("iou"), "hd95": mean("hd95")}
    if num_classes > 2:
        result["dice_per_class"] = {str(k): mean(f"dice_{k}") for k in range(1, num_classes)}
    return result


def paired_difference(a, b, names, resamples=10_000, seed=0):
    """Per-image a - b (e.g. DDPM-v2's Dice minus the U-Net's on the same test images):
    the mean, its 95% percentile-bootstrap interval over images (`resamples` draws of the
    images with replacement), how many images each side wins, and the image a loses most
    on. One training run per side, so the interval covers the choice of test images, not
    the spread between training runs (seeds). Images either side has no score for (NaN)
    are left out."""
    if not len(a) == len(b) == len(names):   # before subtracting: a length 1 would broadcast
        raise ValueError(f"paired scores need one per image: {len(a)}, {len(b)}, "
                         f"{len(names)} names")
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    names = [n for n, keep in zip(names, np.isfinite(d)) if keep]
    d = d[np.isfinite(d)]
    if len(d) == 0:
        raise ValueError("no image has a score on both sides")
    draws = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    low, high = np.percentile(d[draws].mean(axis=1), [2.5, 97.5])
    worst = int(np.argmin(d))
    return {"mean": float(d.mean()), "ci95": [float(low), float(high)], "images": len(d),
            "a_better": int((d > 0).sum()), "b_better": int((d < 0).sum()),
            "largest_loss": {"name": names[worst], "difference": float(d[worst])}}


def choose_steps(model, diffusion, cfg, candidates, seed):
    """The DDIM step count among `candidates` with the highest one-sample Dice on the
    validation split the run held back (from its config `cfg`), and {steps: Dice} for each
    (empty when there is only one). The fewest steps within 0.001 of the best win, as at
    the end of a run (train_utils.fewest_good_steps)."""
    if len(candidates) == 1:
        return candidates[0], {}
    val = build_datasets(cfg.data, image_size=cfg.image_size, channels=cfg.channels,
                         val_fraction=cfg.val_fraction, seed=cfg.seed, augment=False,
                         **dataset_options(cfg))["val"]
    dice = {}
    for steps in candidates:
        generator = torch.Generator().manual_seed(seed)
        dice[steps] = score(lambda image: predicted_labels(
            predict(model, diffusion, image, steps, generator=generator)[0],
            diffusion.num_classes), val, diffusion.num_classes)["dice"]
    return fewest_good_steps(dice), dice


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help="DDIM steps for DDPM-v2; several = chosen on the val split; "
                             "default: the count the run chose at its end")
    parser.add_argument("--ensemble", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--reuse-ddpm", action="store_true",
                        help="score the finished DDPM-v2 run in OUT/ddpm, do not train it")
    parser.add_argument("--unet-from", default=None, metavar="RUN",
                        help="score the U-Net of this earlier bench_quality run (RUN/unet) "
                             "instead of training one")
    parser.add_argument("--flags", default="",
                        help='main.py training flags for both models (the baseline reads '
                             'the data, batch, optimiser, EMA and model ones, not '
                             '--num-workers/--amp/--compile), one string: '
                             '--flags="--batch-size 8"')
    parser.add_argument("--ddpm-flags", default="",
                        help='further main.py training flags for DDPM-v2 only (diffusion, '
                             'loss terms, validation; not ones that change the backbone, '
                             'which go in --flags), one string: '
                             '--ddpm-flags="--loss-boundary 1 --val-every 200"')
    args = parser.parse_args()
    flags, ddpm_flags = shlex.split(args.flags), shlex.split(args.ddpm_flags)
    own = [f for f in flags + ddpm_flags if f.split("=")[0] in OWN_FLAGS]
    if own:
        parser.error(f"{', '.join(own)}: set by the benchmark itself (see its own flags)")
    args.data = str(Path(args.data).resolve())   # main.py runs in the repo root
    name = Path(args.data).name
    out = Path(args.out or ROOT / "trained_models" / "bench_quality" / f"{name}-{args.image_size}")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg, _ = launcher.parse_args(["--data", args.data, "--image-size", str(args.image_size),
                                  "--seed", str(args.seed), "--out", str(out / "ddpm"), *flags])
    test = load_split(args.data, "test", image_size=args.image_size, channels=cfg.channels,
                      seed=cfg.seed, **dataset_options(cfg))
    limit = build_model_and_diffusion(cfg.to_dict())[1].max_ddim_steps
    too_many = [s for s in args.steps or () if s > limit and s != cfg.timesteps]
    if too_many:   # before the training, not after it
        parser.error(f"--steps {too_many}: this config's DDIM sampler takes at most {limit} "
                     f"steps (or {cfg.timesteps}, the ancestral sampler)")

    if args.reuse_ddpm:
        last = read_checkpoint(out / "ddpm" / "last.pt")
        if last.get("sample_steps") is None:   # set by finish_run at the end of a run
            sys.exit(f"--reuse-ddpm: {out / 'ddpm'} holds no finished run")
        stored = TrainConfig.from_dict(last["config"])
        differ = [k for k in (*model_keys(cfg.to_dict()), "data", "image_size", "seed",
                              "class_values", "mask_values")
                  if getattr(stored, k) != getattr(cfg, k)]
        if differ:
            sys.exit(f"--reuse-ddpm: the run in {out / 'ddpm'} differs in {', '.join(differ)}")
        print(f"reusing {out / 'ddpm'}: step {last['step']}, "
              f"{last['wall_seconds'] / 60:.1f} minutes")
    else:
        subprocess.run([sys.executable, "main.py", "--data", args.data, "--image-size",
                    str(args.image_size), "--max-minutes", str(args.minutes), "--seed",
                        str(args.seed), "--out", str(out / "ddpm"), *flags, *ddpm_flags],
                       cwd=ROOT, check=True)
    model, diffusion, ddpm_cfg = load_checkpoint(out / "ddpm" / "best_iou.pt")
    stored = read_checkpoint(out / "ddpm" / "best_iou.pt")
    if args.steps is None:   # as evaluate.py: the run's choice for one sample, for K
        steps = {k: stored_sample_steps(stored, k, diffusion) for k in (1, args.ensemble)}
        val_dice = dict(map(tuple, stored.get("sample_steps_dice") or []))
    else:
        chosen, val_dice = choose_steps(model, diffusion, ddpm_cfg, args.steps, args.seed)
        steps = {1: chosen,
                 args.ensemble: ensemble_steps(val_dice, diffusion) if val_dice else chosen}
    print("DDIM steps by val Dice (one sample): "
          + ", ".join(f"{s}: {d:.4f}" for s, d in val_dice.items())
          + f"; using {steps[1]} for one sample, {steps[args.ensemble]} for K={args.ensemble}")
    results, mirror = {}, ddpm_cfg.trained_mirrored()
    for k in (1, args.ensemble):   # each from the seed, as evaluate.py and bench_sampling
        metrics = evaluate(model, diffusion, test, out / f"eval-k{k}", steps=steps[k],
                           ensemble=k, seed=args.seed, mirror=mirror)
        m, u = metrics["metrics"], metrics["uncertainty"]
        results[f"DDPM-v2 K={k}"] = {
            "dice": m["dice"]["mean"], "iou": m["iou"]["mean"], "hd95": m["hd95"]["mean"],
            "auroc": u["auroc_for_pixel_error"], "entropy_wrong": u["mean_on_wrong_pixels"],
            "entropy_right": u["mean_on_right_pixels"], "ece": metrics["calibration"]["ece"]}
        if "per_class" in metrics:
            results[f"DDPM-v2 K={k}"]["dice_per_class"] = {
                c: v["dice"]["mean"] for c, v in metrics["per_class"].items()}

    if args.unet_from:
        baseline, info = load_baseline(Path(args.unet_from), cfg, args.minutes)
    else:
        baseline, info = train_baseline(cfg, args.minutes)
    unet_rows = []
    with torch.no_grad():
        name_b = "U-Net (BCE + Dice)" if cfg.num_classes == 2 else "U-Net (CE + Dice)"
        results[name_b] = score(lambda image: labels(baseline(image), cfg.num_classes), test,
                                cfg.num_classes, rows=unet_rows)
        if mirror:
            results["reference: U-Net, mirrored"] = score(
                lambda image: mirrored_labels(baseline, image, cfg.num_classes), test,
                cfg.num_classes)
    (out / "unet").mkdir(exist_ok=True)
    # not a DDPM-v2 checkpoint (no "model" key): Deterministic(cfg).load_state_dict(saved["unet"])
    torch.save({"kind": "bench_quality U-Net baseline", "unet": baseline.state_dict(),
                "config": cfg.to_dict(), **info}, out / "unet" / "best_val_dice.pt")
    names = [str(i) for i in range(len(test))]   # evaluate.py's per_image.csv names
    with open(out / "unet" / "per_image.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["name", *unet_rows[0]])
        writer.writeheader()
        writer.writerows({"name": n, **r} for n, r in zip(names, unet_rows))
    paired = {}
    for k in (1, args.ensemble):   # each DDPM-v2 row against the U-Net, image by image
        with open(out / f"eval-k{k}" / "per_image.csv") as f:
            ddpm = list(csv.DictReader(f))
        if [r["name"] for r in ddpm] != names:   # nnU-Net data: evaluate.py scores volumes
            print(f"DDPM-v2 K={k}: per-case rows, not the U-Net's per-image ones: "
                  f"no image-by-image comparison")
            continue
        paired[f"DDPM-v2 K={k} - {name_b}"] = paired_difference(
            [float(r["dice"]) for r in ddpm], [r["dice"] for r in unet_rows], names,
            seed=args.seed)

    print(f"\n{name} at {args.image_size} px, {args.minutes:g} training minutes each, "
          f"{len(test)} test images, DDPM-v2 sampled with {steps[1]} DDIM steps "
          f"(K={args.ensemble}: {steps[args.ensemble]})")
    print(f"{'model':26s} {'Dice':>7s} {'IoU':>7s} {'HD95 px':>8s} {'AUROC':>6s} "
          f"{'H wrong':>7s} {'H right':>7s} {'ECE':>7s}")
    for model_name, r in results.items():
        extra = (f" {r['auroc']:6.3f} {r['entropy_wrong']:7.3f} {r['entropy_right']:7.3f} "
                 f"{r['ece']:7.4f}" if "auroc" in r else "")
        print(f"{model_name:26s} {r['dice']:7.4f} {r['iou']:7.4f} {r['hd95']:8.3f}" + extra)
        if "dice_per_class" in r:
            print(" " * 27 + "Dice per class: " + "  ".join(
                f"{c}: {d:.4f}" for c, d in r["dice_per_class"].items()))
    for pair, p in paired.items():
        print(f"{pair}, Dice per test image: mean {p['mean']:+.4f}, 95% interval "
              f"[{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]; better on {p['a_better']}, worse "
              f"on {p['b_better']} of {p['images']} images; its worst image "
              f"{p['largest_loss']['name']} "
              f"({p['largest_loss']['difference']:+.4f})")
    report = {"data": args.data, "image_size": args.image_size, "minutes": args.minutes,
              "seed": args.seed, "steps": steps[1], "ensemble_steps": steps[args.ensemble],
              "mirror": mirror,
              "val_dice_by_steps": val_dice, "flags": flags,
              "ddpm_flags": ddpm_flags,
              "reused_ddpm": args.reuse_ddpm,
              "unet_from": str(Path(args.unet_from).resolve()) if args.unet_from else None,
              "results": results, "paired_dice": paired,
              "baseline_training": info, "threads": torch.get_num_threads()}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
