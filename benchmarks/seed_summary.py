"""Side by sides over seeds: DDPM-v2 against the U-Net, seed by seed and on the mean.

    python benchmarks/seed_summary.py trained_models/bench_quality/jsrt-128-seed*/results.json

Each argument is a results.json written by bench_quality.py, or by rescore.py (whose run's
own results.json gives the data, size and seed). Runs are grouped by data set and image
size; a group lists each seed's DDPM-v2 row (--row, default the K=5 ensemble) beside the
U-Net's, their difference and both training step counts, then the means over its seeds,
the standard deviation of the per-seed differences and a 95% Student-t interval for their
mean (it covers the spread between training runs, where bench_quality's paired interval
covers the choice of test images). A seed given twice (e.g. a run and its rescore) keeps
the later argument. Prints markdown.

    python benchmarks/seed_summary.py VARIANT/results.json ... --against DEFAULTS/results.json ...

--against compares the DDPM-v2 runs given first (a variant, e.g. bench_quality --ddpm-flags)
with these (e.g. the defaults) seed by seed, on the seeds both have: the test Dice of --row
and the one-sample val Dice each run chose its DDIM steps by (the figure a default is
chosen on), each difference with its mean and t-interval over the seeds; then the val IoU
at equal optimiser steps (each run's ddpm/metrics.csv), at the validations all of them
made, which a wall-clock budget's drifting step counts do not touch.
"""
import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_utils import fewest_good_steps  # noqa: E402
from utils import read_checkpoint  # noqa: E402


def load_run(path, row):
    """One seed's figures from a bench_quality or rescore results.json."""
    path = Path(path)
    report = json.loads(path.read_text())
    run = Path(report["run"]) if "run" in report else path.parent
    own = report if "run" not in report else json.loads((run / "results.json").read_text())
    unet = next(k for k in report["results"] if k.startswith("U-Net"))
    last = run / "ddpm" / "last.pt"
    val = {int(k): v for k, v in (report.get("val_dice_by_steps") or {}).items()}
    return {"data": Path(own["data"]).name, "image_size": own["image_size"],
            "seed": own["seed"], "source": str(path),
            "val": val[fewest_good_steps(val)] if val else math.nan, "curve": val_curve(run),
            "ddpm": report["results"][row]["dice"], "unet": report["results"][unet]["dice"],
            "ddpm_steps": read_checkpoint(last)["step"] if last.exists() else None,
            "unet_steps": own.get("baseline_training", {}).get("steps")}


def val_curve(run):
    """{step: val IoU} from a run's metrics.csv (one sample, EMA, at each validation)."""
    path = run / "ddpm" / "metrics.csv"
    if not path.exists():
        return {}
    with open(path) as f:
        return {int(r["step"]): float(r["val_iou"]) for r in csv.DictReader(f)
                if r.get("val_iou")}


def summarise(differences):
    """Mean, sample standard deviation and 95% t-interval of per-seed differences."""
    d = np.asarray(differences, dtype=float)
    n = len(d)
    if n < 2:
        return {"n": n, "mean": float(d.mean()), "sd": math.nan, "ci95": (math.nan, math.nan)}
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": float(d.mean()), "sd": sd,
            "ci95": (float(d.mean()) - half, float(d.mean()) + half)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results.json files")
    parser.add_argument("--row", default="DDPM-v2 K=5", help="the DDPM-v2 row to compare")
    parser.add_argument("--against", nargs="+", default=None, metavar="RESULTS",
                        help="results.json files of the runs to compare the DDPM-v2 runs "
                             "above with, seed by seed (e.g. the defaults)")
    args = parser.parse_args(argv)
    groups, others = by_group(args.results, args.row), by_group(args.against or [], args.row)
    for key, by_seed in groups.items():
        data, size = key
        runs = [by_seed[s] for s in sorted(by_seed)]
        print(f"\n{data}, {size} px: {args.row} against the U-Net\n")
        print("| seed | DDPM-v2 | U-Net | difference | steps DDPM-v2 / U-Net |")
        print("|---|---|---|---|---|")
        for r in runs:
            print(f"| {r['seed']} | {r['ddpm']:.4f} | {r['unet']:.4f} | "
                  f"{r['ddpm'] - r['unet']:+.4f} | {r['ddpm_steps']} / {r['unet_steps']} |")
        s = summarise([r["ddpm"] - r["unet"] for r in runs])
        print(f"| mean of {s['n']} | {np.mean([r['ddpm'] for r in runs]):.5f} | "
              f"{np.mean([r['unet'] for r in runs]):.5f} | {s['mean']:+.5f} | |")
        print(f"\nper-seed difference: sd {s['sd']:.4f}, 95% t-interval of the mean "
              f"[{s['ci95'][0]:+.4f}, {s['ci95'][1]:+.4f}] over {s['n']} seeds")
        if {0, 1} <= set(by_seed):
            pair = np.mean([by_seed[k]["ddpm"] - by_seed[k]["unet"] for k in (0, 1)])
            print(f"seeds 0 and 1 (issue 16's target): mean difference {pair:+.5f}")
        if key in others:
            compare(by_seed, others[key])
    return groups


def by_group(paths, row):
    """{(data, image_size): {seed: load_run(...)}}, a later file winning for a seed."""
    groups = {}
    for path in paths:
        r = load_run(path, row)
        groups.setdefault((r["data"], r["image_size"]), {})[r["seed"]] = r
    return groups


def compare(variant, base):
    """A DDPM-v2 variant against other DDPM-v2 runs (by seed): test and val Dice."""
    seeds = sorted(set(variant) & set(base))
    print("\nDDPM-v2 runs given first against the --against runs, seed by seed\n")
    print("| seed | test Dice | against | difference | val Dice (one sample) | against "
          "| difference | steps |")
    print("|---|---|---|---|---|---|---|---|")
    for s in seeds:
        a, b = variant[s], base[s]
        print(f"| {s} | {a['ddpm']:.4f} | {b['ddpm']:.4f} | {a['ddpm'] - b['ddpm']:+.4f} | "
              f"{a['val']:.4f} | {b['val']:.4f} | {a['val'] - b['val']:+.4f} | "
              f"{a['ddpm_steps']} / {b['ddpm_steps']} |")
    for name, k in (("test", "ddpm"), ("val", "val")):
        s = summarise([variant[i][k] - base[i][k] for i in seeds])
        print(f"{name} Dice difference: mean {s['mean']:+.5f}, sd {s['sd']:.4f}, 95% "
              f"t-interval [{s['ci95'][0]:+.4f}, {s['ci95'][1]:+.4f}] over {s['n']} seeds")
    # at equal optimiser steps: a wall-clock budget gives each run its own step count
    steps = sorted(set.intersection(*(set(variant[i]["curve"]) & set(base[i]["curve"])
                                      for i in seeds))) if seeds else []
    if steps:
        print("\nval IoU (one sample) at equal optimiser steps, variant minus --against, "
              "by seed, then the mean and t-interval over seeds\n")
        print("| step | " + " | ".join(f"seed {i}" for i in seeds) + " | mean [95% interval] |")
        print("|---|" + "---|" * (len(seeds) + 1))
        for step in steps:
            d = [variant[i]["curve"][step] - base[i]["curve"][step] for i in seeds]
            s = summarise(d)
            print(f"| {step} | " + " | ".join(f"{x:+.4f}" for x in d)
                  + f" | {s['mean']:+.4f} [{s['ci95'][0]:+.4f}, {s['ci95'][1]:+.4f}] |")


if __name__ == "__main__":
    main()
