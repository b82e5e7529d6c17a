"""The end-of-run choice of DDIM steps of every finished run under a folder, side by side.

    python benchmarks/step_choices.py trained_models

For each best_iou.pt that stores the one-sample val Dice of the candidate step counts
(`sample_steps_dice`, written by train_utils.finish_run), prints the count the run chose for
one sample and for an ensemble, and each candidate's Dice minus the best one's: how often a
candidate is worth its cost. Since 99e1392 a run stops scoring once a count falls more than
0.001 below the best (and scores the largest only if its budget has room): a count it did
not score shows as "-", and only full scans say whether the Dice ever climbs back. Reads
checkpoints only; trains and samples nothing.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_utils import SAMPLE_STEP_CANDIDATES as CANDIDATES  # noqa: E402


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
        gaps = ", ".join(f"{steps}: {dice[steps] - best:+.4f}" if steps in dice else f"{steps}: -"
                         for steps in sorted({*dice, *CANDIDATES}))
        print(f"| {path.parent.relative_to(args.folder)} | {state.get('sample_steps')} / "
              f"{state.get('ensemble_steps', '-')} | {gaps} |")


if __name__ == "__main__":
    main()
