"""The end-of-run choice of DDIM steps of every finished run under a folder, side by side.

    python benchmarks/step_choices.py trained_models

For each best_iou.pt that stores the one-sample val Dice of every candidate step count
(`sample_steps_dice`, written by train_utils.finish_run), prints the count the run chose for
one sample and for an ensemble, and each candidate's Dice minus the best one's: how often a
candidate is worth its cost. Reads checkpoints only; trains and samples nothing.
"""
import argparse
from pathlib import Path

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", default="trained_models")
    args = parser.parse_args()
    print("| run | chosen (one / ensemble) | val Dice minus the best, by DDIM steps |")
    print("|---|---|---|")
    for path in sorted(Path(args.folder).rglob("best_iou.pt")):
        state = torch.load(path, map_location="cpu", weights_only=True)
        dice = dict(map(tuple, state.get("sample_steps_dice") or []))
        if not dice:
            continue
        best = max(dice.values())
        gaps = ", ".join(f"{steps}: {d - best:+.4f}" for steps, d in dice.items())
        print(f"| {path.parent.relative_to(args.folder)} | {state.get('sample_steps')} / "
              f"{state.get('ensemble_steps', '-')} | {gaps} |")


if __name__ == "__main__":
    main()
