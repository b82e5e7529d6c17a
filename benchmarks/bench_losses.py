"""Which extra loss term helps? Same data, seed and wall-clock budget for each variant.

    python benchmarks/bench_losses.py --data ../shared/data/lung-ct-64 --minutes 10

Trains main.py once per variant (MSE alone, + Dice, + boundary, + Hausdorff), then scores
each run's best_iou.pt (EMA weights) on the test split with evaluate.py's metrics: one DDIM
sample of 25 steps per image, threshold 0.5. Prints a table and writes JSON.
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

from dataset import ContourDataset  # noqa: E402
from evaluate import evaluate  # noqa: E402
from utils import load_checkpoint  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "lung-ct-64"))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--dice", type=float, default=0.5, help="weight of --loss-dice")
    parser.add_argument("--boundary", type=float, default=1.0, help="weight of --loss-boundary")
    parser.add_argument("--hausdorff", type=float, default=1.0,
                        help="weight of --loss-hausdorff")
    parser.add_argument("--variants", nargs="+", default=["mse", "dice", "boundary", "hausdorff"])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--out", default=str(ROOT / "trained_models" / "bench_losses"))
    args = parser.parse_args()

    flags = {"mse": [], "dice": ["--loss-dice", str(args.dice)],
             "boundary": ["--loss-boundary", str(args.boundary)],
             "hausdorff": ["--loss-hausdorff", str(args.hausdorff)]}
    out = Path(args.out)
    results = []
    for variant in args.variants:
        run = out / variant
        command = [sys.executable, "main.py", "--data", args.data, "--image-size",
                   str(args.image_size), "--max-minutes", str(args.minutes), "--out", str(run),
                   *flags[variant]]
        start = time.time()
        subprocess.run(command, cwd=ROOT, check=True)
        minutes = (time.time() - start) / 60
        model, diffusion, config = load_checkpoint(run / "best_iou.pt")
        test = ContourDataset(args.data, split="test", image_size=config.image_size,
                              channels=config.channels)
        metrics = evaluate(model, diffusion, test, run / "eval", steps=args.steps,
                           names=test.names)
        m = metrics["metrics"]
        results.append({"variant": "MSE" if variant == "mse" else f"MSE + {variant}",
                        "flags": flags[variant], "minutes": minutes,
                        "best_epoch": torch.load(run / "best_iou.pt", weights_only=True)["epoch"],
                        "dice": m["dice"]["mean"], "hd95": m["hd95"]["mean"],
                        "hd95_images": m["hd95"]["n"], "iou": m["iou"]["mean"]})
    print(f"\n{'loss':18s} {'Dice':>7s} {'IoU':>7s} {'HD95 px':>8s} {'best epoch':>10s}")
    for r in results:
        print(f"{r['variant']:18s} {r['dice']:7.4f} {r['iou']:7.4f} {r['hd95']:8.3f} "
              f"{r['best_epoch']:10d}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
