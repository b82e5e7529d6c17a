"""Measure the training targets: run main.py as a user would, then score the checkpoint.

    python benchmarks/train_targets.py synthetic                 # `python main.py`, no flags
    python benchmarks/train_targets.py lung --prediction eps x0 v --minutes 10
    python benchmarks/train_targets.py lung --prediction x0 --model unet2d convnext_tiny resnet18

`synthetic` times the no-argument run and reads its best EMA val IoU; beside it, the IoU of
the best global intensity threshold and of the best per-image threshold on the same val set
(`dataset.threshold_baseline`), the floor the model must beat. `lung` trains on
lung-ct-64 at 64 px for --minutes per backbone (--model) and prediction type (same seed),
one run at a time, then scores best_iou.pt (EMA weights) on the test split: Dice and IoU of
a single sample with 25 DDIM steps, threshold 0.5. Prints a table and writes JSON next to
the runs.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataset import ContourDataset, build_datasets, threshold_baseline  # noqa: E402
from utils import load_checkpoint, overlap_scores  # noqa: E402


def run_main(args, out):
    """Run main.py in a fresh process; returns wall seconds."""
    start = time.time()
    subprocess.run([sys.executable, "main.py", *args, "--out", str(out)], cwd=ROOT, check=True)
    return time.time() - start


@torch.no_grad()
def test_scores(checkpoint, data, steps=25, batch_size=32, seed=0):
    """Mean Dice and IoU over the test split, one DDIM sample per image, threshold 0.5."""
    model, diffusion, config = load_checkpoint(checkpoint)
    test = ContourDataset(data, split="test", image_size=config.image_size,
                          channels=config.channels)
    loader = torch.utils.data.DataLoader(test, batch_size=batch_size)
    generator = torch.Generator().manual_seed(seed)
    dice, iou = [], []
    for image, mask in loader:
        probs = diffusion.sample(model, image, steps=steps, generator=generator)
        batch_dice, batch_iou = overlap_scores(probs > 0.5, mask > 0.5)
        dice += batch_dice.tolist()
        iou += batch_iou.tolist()
    return sum(dice) / len(dice), sum(iou) / len(iou), len(dice)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=("synthetic", "lung"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "lung-ct-64"))
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--prediction", nargs="+", default=["eps", "x0", "v"])
    parser.add_argument("--model", nargs="+", default=["unet2d"],
                        help="backbones from model.MODELS")
    parser.add_argument("--out", default=str(ROOT / "trained_models" / "targets"))
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="further main.py flags for every run")
    args = parser.parse_args()
    out = Path(args.out)
    results = []
    if args.target == "synthetic":
        run = out / "synthetic-default"
        seconds = run_main(args.extra, run)
        state = torch.load(run / "last.pt", weights_only=True)
        cfg = state["config"]
        sizes = (cfg["synthetic_train"], cfg["synthetic_val"], cfg["synthetic_test"])
        val = build_datasets(None, image_size=cfg["image_size"], seed=cfg["seed"],
                             synthetic_sizes=sizes)["val"]
        floor = threshold_baseline(val, num_samples=len(val))
        results.append({"run": "python main.py", "minutes": seconds / 60,
                        "epochs": state["epoch"], "best_val_iou": state["best_iou"],
                        "final_val_iou": state["val_iou"],
                        "threshold_iou_global": floor["global"],
                        "threshold_iou_per_image": floor["per_image"]})
        print(f"\n{'run':16s} {'minutes':>8s} {'epochs':>7s} {'best val IoU':>13s} "
              f"{'threshold IoU (global / per image)':>35s}")
        r = results[0]
        print(f"{r['run']:16s} {r['minutes']:8.2f} {r['epochs']:7d} {r['best_val_iou']:13.4f} "
              f"{r['threshold_iou_global']:17.4f} / {r['threshold_iou_per_image']:.4f}")
    else:
        for model_name in args.model:
            for prediction in args.prediction:
                name = prediction if model_name == "unet2d" else f"{model_name}-{prediction}"
                run = out / f"lung-{name}"
                flags = ["--data", args.data, "--image-size", "64", "--max-minutes",
                         str(args.minutes), "--prediction", prediction, "--model", model_name,
                         *args.extra]
                seconds = run_main(flags, run)
                dice, iou, n = test_scores(run / "best_iou.pt", args.data)
                state = torch.load(run / "best_iou.pt", weights_only=True)
                last = torch.load(run / "last.pt", weights_only=True)
                results.append({"model": model_name, "prediction": prediction,
                                "minutes": seconds / 60, "best_epoch": state["epoch"],
                                "epochs": last["epoch"], "steps": last["step"],
                                "best_val_iou": state["val_iou"], "test_dice": dice,
                                "test_iou": iou, "test_images": n, "flags": flags})
        print(f"\n{'model':13s} {'prediction':10s} {'minutes':>8s} {'epochs':>6s} "
              f"{'steps':>6s} {'best epoch':>10s} {'val IoU':>8s} {'test Dice':>9s} "
              f"{'test IoU':>9s}")
        for r in results:
            print(f"{r['model']:13s} {r['prediction']:10s} {r['minutes']:8.2f} "
                  f"{r['epochs']:6d} {r['steps']:6d} {r['best_epoch']:10d} "
                  f"{r['best_val_iou']:8.4f} {r['test_dice']:9.4f} {r['test_iou']:9.4f}")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.target}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
