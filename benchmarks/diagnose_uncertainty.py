"""Why an ensemble's uncertainty does (not) predict its errors, on one checkpoint.

    python benchmarks/diagnose_uncertainty.py --checkpoint RUN/best_iou.pt --split val
    python benchmarks/diagnose_uncertainty.py --checkpoint RUN/best_iou.pt --steps 1 2 5

Samples a K-sample ensemble (DDIM, --eta; members mirrored as evaluate.py's --mirror) for
every image of the split the run held back, as evaluate.py does, once per --steps value,
and prints for each: the mean Dice of the fused (mean) ensemble and of its single samples; over all pixels, the share of wrongly
segmented pixels on which the K thresholded samples disagree at all (and of the right
ones); the pixel-error
AUROC of the entropy of the mean probability (evaluate.py's measure), of that entropy
rounded to 1e-4, 1e-3 and 1e-2 bits (so near-certain pixels tie instead of being ranked
by float noise), of the entropy of the vote fraction, and of the per-pixel variance. Writes
nothing.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluate import build_parser as evaluate_parser  # noqa: E402
from evaluate import mirror_setting, predict, scored_dataset  # noqa: E402
from utils import auroc, load_checkpoint, overlap_scores  # noqa: E402


def evaluate_args(checkpoint, data, split):
    """evaluate.py's arguments for reading a split as the run did."""
    return evaluate_parser().parse_args(["--checkpoint", str(checkpoint), "--split", split]
                                        + (["--data", data] if data else []))


def binary_entropy(p):
    p = np.clip(p, 0, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(p > 0, p * np.log2(p), 0) + np.where(p < 1, (1 - p) * np.log2(1 - p), 0))
    return np.nan_to_num(h)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default=None, help="default: the run's own data")
    parser.add_argument("--split", default="val")
    parser.add_argument("--steps", type=int, nargs="+", default=[5])
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--ensemble", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mirror", default="auto", choices=("auto", "on", "off"),
                        help="as evaluate.py's: auto = on for a run trained with flips")
    args = parser.parse_args()
    model, diffusion, cfg = load_checkpoint(args.checkpoint)
    if diffusion.num_classes > 2:
        sys.exit(f"{args.checkpoint} segments {diffusion.num_classes} classes; this benchmark "
                 "scores binary masks (use evaluate.py for label maps)")
    data = scored_dataset(cfg, evaluate_args(args.checkpoint, args.data, args.split))
    mirror = mirror_setting(args.mirror, cfg)
    images, masks = map(torch.stack, zip(*[data[i] for i in range(len(data))]))
    truth = masks > 0.5
    for steps in args.steps:
        fused, samples, unc = predict(model, diffusion, images, steps, ensemble=args.ensemble,
                                      eta=args.eta, mirror=mirror,
                                      generator=torch.Generator().manual_seed(args.seed))
        dice = overlap_scores(fused > 0.5, truth)[0].mean().item()
        single = np.mean([overlap_scores(samples[:, k:k + 1] > 0.5, truth)[0].mean().item()
                          for k in range(samples.shape[1])])
        wrong = ((fused > 0.5) != truth).numpy().ravel()
        entropy = unc["entropy"].numpy().ravel()
        votes = (samples > 0.5).float().mean(1).numpy().ravel()
        disagree = (votes > 0) & (votes < 1)
        print(f"\n{steps} DDIM steps, eta {args.eta:g}, K={args.ensemble}"
              f"{' mirrored' if mirror else ''}, {len(data)} images: "
              f"Dice fused {dice:.4f}, single samples {single:.4f}; {wrong.mean():.2%} of "
              f"pixels wrong; samples disagree on {disagree[wrong].mean():.1%} of the wrong "
              f"pixels and {disagree[~wrong].mean():.2%} of the right ones")
        print(f"pixel-error AUROC: entropy {auroc(entropy, wrong):.3f}; "
              + "; ".join(f"rounded to {r:g} bits {auroc(np.round(entropy / r) * r, wrong):.3f}"
                          for r in (1e-4, 1e-3, 1e-2))
              + f"; vote entropy {auroc(binary_entropy(votes), wrong):.3f}; "
              f"variance {auroc(unc['variance'].numpy().ravel(), wrong):.3f}", flush=True)


if __name__ == "__main__":
    main()
