"""Dice and seconds per image of each sampler setting, on one checkpoint and test split.

    python benchmarks/bench_sampling.py --checkpoint trained_models/lung-ct-64-64/best_iou.pt \
        --data ../shared/data/lung-ct-64

Rows: the full ancestral DDPM sampler (steps = T) and strided DDIM at fewer steps, each as a
single sample and as a K-sample ensemble (mean fusion; members mirrored as evaluate.py's
--mirror auto, or as --mirror says). Ensembles of the slow settings are
skipped above --ensemble-max-steps (a 1000-step K=5 ensemble costs 5000 forward passes per
image). Prints a table and writes JSON (--json).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataset import ContourDataset  # noqa: E402
from evaluate import mirror_setting, predict, prepare_model  # noqa: E402
from utils import load_checkpoint, overlap_scores  # noqa: E402


def run_setting(model, diffusion, images, masks, steps, ensemble, batch_size, seed, amp,
                mirror=False):
    generator = torch.Generator().manual_seed(seed)
    dice = []
    start = time.perf_counter()
    for i in range(0, images.shape[0], batch_size):
        fused, _, _ = predict(model, diffusion, images[i:i + batch_size], steps, ensemble,
                              "mean", generator=generator, amp=amp, mirror=mirror)
        dice.append(overlap_scores(fused.cpu() > 0.5, masks[i:i + batch_size] > 0.5)[0])
    seconds = time.perf_counter() - start
    return torch.cat(dice).mean().item(), seconds / images.shape[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 100, 50, 25, 10, 5])
    parser.add_argument("--ensemble", type=int, default=5)
    parser.add_argument("--ensemble-max-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mirror", default="auto", choices=("auto", "on", "off"),
                        help="as evaluate.py's: auto = on for a run trained with flips")
    parser.add_argument("--json", default=None, help="where to write the results")
    args = parser.parse_args()

    model, diffusion, config = load_checkpoint(args.checkpoint)
    if diffusion.num_classes > 2:
        sys.exit(f"{args.checkpoint} segments {diffusion.num_classes} classes; this benchmark "
                 "scores binary masks (use evaluate.py for label maps)")
    model = prepare_model(model, torch.device(args.device), args.compile)
    mirror = mirror_setting(args.mirror, config)
    amp = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    data = ContourDataset(args.data, split=args.split, image_size=config.image_size,
                          channels=config.channels)
    images, masks = map(torch.stack, zip(*[data[i] for i in range(len(data))]))
    rows = []
    for steps in args.steps:
        for k in (1, args.ensemble):
            if k > 1 and steps > args.ensemble_max_steps:
                continue
            dice, seconds = run_setting(model, diffusion, images, masks, steps, k,
                                        max(1, args.batch_size // k), args.seed, amp, mirror)
            sampler = "ancestral" if steps == diffusion.num_timesteps else "DDIM"
            rows.append({"sampler": sampler, "steps": steps, "samples": k, "dice": dice,
                         "seconds_per_image": seconds})
            print(f"{sampler:9s} {steps:5d} steps  K={k}  dice {dice:.4f}  "
                  f"{seconds:.4f} s/image", flush=True)
    base = next((r for r in rows if r["steps"] == diffusion.num_timesteps and r["samples"] == 1),
                None)
    print(f"\n{'sampler':9s} {'steps':>5s} {'K':>2s} {'Dice':>7s} {'s/image':>9s} {'speed-up':>9s}")
    for r in rows:
        speedup = base["seconds_per_image"] / r["seconds_per_image"] if base else None
        r["speedup_vs_ancestral"] = speedup    # None (JSON null) without an ancestral row
        print(f"{r['sampler']:9s} {r['steps']:5d} {r['samples']:2d} {r['dice']:7.4f} "
              f"{r['seconds_per_image']:9.4f} "
              + (f"{speedup:9.1f}" if speedup is not None else f"{'-':>9s}"))
    result = {"checkpoint": args.checkpoint, "data": args.data, "split": args.split,
              "images": len(data), "device": args.device, "amp": args.amp, "mirror": mirror,
              "torch_threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
