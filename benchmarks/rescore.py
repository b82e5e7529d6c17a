"""Score the DDPM-v2 half of finished bench_quality runs again with this commit's sampler.

    python benchmarks/rescore.py trained_models/reproduce/jsrt-128-seed0 \
        trained_models/reproduce/lung-64-seed0

For a change that touches sampling only (the DDIM grid, the choice of steps), not training,
or only which weights best_iou.pt keeps: this commit's rule (Progress.record_validation) is
replayed over the run's validations (metrics.csv) and the weights it lands on are scored,
best_iou.pt or last.pt, whichever holds that step (others were not kept: an error). The
end-of-run choice of DDIM steps is made again on those EMA weights and the val split
with this commit's code (train_utils.score_sample_steps, fewest_good_steps, ensemble_steps,
as finish_run makes it), and the test split is scored as bench_quality.py scores it
(evaluate.evaluate, one sample and a K=5 ensemble, seeded by the run's seed, mirrored as
evaluate.py's --mirror auto). The U-Net's figures are the bench_quality run's own (its
results.json): its training is not touched; for a mirrored ensemble its weights are also
scored with the same mirroring (bench_quality's reference row).
The checkpoint is not changed. Writes <run>/rescore-<commit>/ (evaluate's files and
results.json) and prints a markdown table.
"""
import argparse
import csv
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dataset import load_split  # noqa: E402
from evaluate import evaluate  # noqa: E402
from train_utils import (amp_dtype, build_loaders, dataset_options,  # noqa: E402
                         ensemble_steps, fewest_good_steps, score_sample_steps)
from bench_quality import baseline_model, mirrored_labels, read_baseline, score  # noqa: E402
from reproduce import commit  # noqa: E402
from utils import Progress, TrainConfig, load_checkpoint, read_checkpoint  # noqa: E402


def weights_by_rule(folder):
    """The checkpoint of a run folder that this commit's best_iou.pt rule would have left
    there, replayed over the validations of its metrics.csv, and its step."""
    config = TrainConfig.from_dict(read_checkpoint(folder / "last.pt")["config"])
    progress, chosen = Progress(), None   # (metrics.csv rounds to 6 significant digits)
    with open(folder / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row["val_iou"]:
                progress.step = int(row["step"])
                if "best_iou.pt" in progress.record_validation(
                        float(row["val_iou"]), float(row["val_mse"]), config.min_delta):
                    chosen = progress.step
    if chosen is None:
        sys.exit(f"{folder}: metrics.csv logs no validation")
    for name in ("best_iou.pt", "last.pt"):
        if read_checkpoint(folder / name)["step"] == chosen:
            return name, chosen
    sys.exit(f"{folder}: the rule keeps the weights of step {chosen}, which no checkpoint holds")


def rescore(run, ensemble, tag, device):
    """Choose the steps again for the weights best_iou.pt's rule keeps (weights_by_rule) and
    score its test split."""
    name, step = weights_by_rule(run / "ddpm")
    print(f"{run.name}: the rule keeps step {step}: {name}", flush=True)
    model, diffusion, cfg = load_checkpoint(run / "ddpm" / name)
    model.to(device)
    cfg.num_workers = 0
    _, _, val_loader = build_loaders(cfg, device)
    dice = score_sample_steps(model, diffusion, val_loader, cfg, device,
                              amp_dtype(cfg.amp, device))   # the run's own precision
    steps = {1: fewest_good_steps(dice), ensemble: ensemble_steps(dice, diffusion)}
    print(f"{run.name}: val Dice by DDIM steps (one sample) "
          + ", ".join(f"{s}: {d:.4f}" for s, d in dice.items())
          + f"; one sample {steps[1]}, K={ensemble} {steps[ensemble]}", flush=True)
    test = load_split(cfg.data, "test", image_size=cfg.image_size, channels=cfg.channels,
                      seed=cfg.seed, **dataset_options(cfg))
    out = run / f"rescore-{tag}"
    before = json.loads((run / "results.json").read_text())
    results, mirror = {}, cfg.trained_mirrored()
    for k in sorted({1, ensemble}):
        m = evaluate(model, diffusion, test, out / f"eval-k{k}", steps=steps[k], ensemble=k,
                     seed=cfg.seed, mirror=mirror)
        u = m["uncertainty"]
        results[f"DDPM-v2 K={k}"] = {
            "dice": m["metrics"]["dice"]["mean"], "iou": m["metrics"]["iou"]["mean"],
            "hd95": m["metrics"]["hd95"]["mean"], "auroc": u["auroc_for_pixel_error"],
            "entropy_wrong": u["mean_on_wrong_pixels"],
            "entropy_right": u["mean_on_right_pixels"], "ece": m["calibration"]["ece"],
            "steps": steps[k]}
        if "per_class" in m:
            results[f"DDPM-v2 K={k}"]["dice_per_class"] = {
                c: v["dice"]["mean"] for c, v in m["per_class"].items()}
    results.update({k: v for k, v in before["results"].items() if not k.startswith("DDPM")})
    if mirror:
        unet = baseline_model(read_baseline(run))
        with torch.no_grad():
            results["reference: U-Net, mirrored"] = score(
                lambda image: mirrored_labels(unet, image, cfg.num_classes), test,
                cfg.num_classes)
    report = {"commit": tag, "run": str(run), "checkpoint": name, "step": step,
              "val_dice_by_steps": dice, "mirror": mirror,
              "results": results,
              "before": {k: v for k, v in before["results"].items() if k.startswith("DDPM")}}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="bench_quality --out folders")
    parser.add_argument("--ensemble", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="where the runs trained (bench_quality "
                                                        "compares on the CPU)")
    args = parser.parse_args()
    tag = commit()
    reports = [rescore(Path(run).resolve(), args.ensemble, tag, torch.device(args.device))
               for run in args.runs]
    print(f"\nrescored at {tag}\n")
    print("| run | model | DDIM steps | Dice | IoU | HD95 px | AUROC | entropy wrong / right "
          "| ECE | Dice before |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in reports:
        for name, m in r["results"].items():
            if "auroc" not in m:   # the U-Net (as the run scored it) and its mirrored row
                print(f"| {Path(r['run']).name} | {name} | | {m['dice']:.4f} | {m['iou']:.4f} "
                      f"| {m['hd95']:.2f} | | | | |")
                continue
            print(f"| {Path(r['run']).name} | {name} | {m['steps']} | {m['dice']:.4f} | "
                  f"{m['iou']:.4f} | {m['hd95']:.2f} | {m['auroc']:.3f} | "
                  f"{m['entropy_wrong']:.3f} / {m['entropy_right']:.3f} | {m['ece']:.4f} | "
                  f"{r['before'].get(name, {}).get('dice', float('nan')):.4f} |")


if __name__ == "__main__":
    main()
