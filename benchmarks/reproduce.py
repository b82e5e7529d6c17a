"""One command for the quality figures of the README's results table, all from one commit.

    python benchmarks/reproduce.py                    # every part, one after another
    python benchmarks/reproduce.py --parts lung jsrt  # some of them

Run it alone on the machine: the parts are bounded by wall-clock minutes. On the project's
2-core CPU machine the whole takes about 3 h 30 min. Parts:

  lung     bench_quality.py, lung-ct-64 at 64 px, 10 minutes each side, seeds 0 and 1
  jsrt     bench_quality.py, jsrt-lungs at 128 px, 10 minutes each side, seeds 0 and 1
  jsrt256  bench_quality.py, jsrt-lungs at 256 px, 20 minutes each side, seed 0
  small    main.py on the first 50 pairs (by name) of jsrt-lungs/train at 128 px for 10
           minutes: how many of them it trained (a small set must not stop early)
  demo     `python main.py` (synthetic contours, its 8-minute cap) and its val IoU
  organs64 main.py + evaluate.py on jsrt-organs (4 classes) at 64 px, 10 minutes, seed 0
  organs   bench_quality.py, jsrt-organs at 128 px, 10 minutes each side, seed 0

Every DDPM-v2 run uses the defaults (no tuning flag), and is scored as evaluate.py scores
it with no sampler flags: one sample and a K=5 ensemble with the DDIM steps the run chose.
Each run also reports the share of its wall time validation took. Writes the runs and
reproduced-<commit>.json under --out (trained_models/reproduce/) and prints a markdown
table to paste into benchmarks/RESULTS.md.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PARTS = ("lung", "jsrt", "jsrt256", "small", "demo", "organs64", "organs")
ORGANS = ["--num-classes", "4"]   # jsrt-organs: background, right lung, left lung, heart


def commit():
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                          capture_output=True).stdout.strip() or "unknown"


def run(cmd):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)


def run_share(run_folder):
    """Minutes of wall time, optimiser steps and the validation share of a finished run."""
    state = torch.load(Path(run_folder) / "last.pt", weights_only=True)
    wall = state.get("wall_seconds") or 0.0
    return {"minutes": wall / 60, "steps": state["step"],
            "validation_share": state.get("val_seconds", 0.0) / wall if wall else None,
            "stopped_early": state.get("stopped_early"), "sample_steps": state.get("sample_steps"),
            "ensemble_steps": state.get("ensemble_steps")}


def quality(data, size, minutes, seed, out, flags=()):
    run([sys.executable, "benchmarks/bench_quality.py", "--data", data, "--image-size", size,
         "--minutes", minutes, "--seed", seed, "--out", out,
         *([f"--flags={' '.join(flags)}"] if flags else [])])
    report = json.loads((Path(out) / "results.json").read_text())
    return {"results": report["results"], "steps": report["steps"],
            "ensemble_steps": report.get("ensemble_steps", report["steps"]),
            "ddpm_run": run_share(Path(out) / "ddpm")}


def small_set(out):
    """A split folder holding links to the first 50 pairs of jsrt-lungs/train (no copies)."""
    folder = Path(out) / "jsrt-lungs-first50"
    for sub in ("images", "masks"):
        (folder / "train" / sub).mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in (DATA / "jsrt-lungs" / "train" / "images").iterdir())[:50]
    for name in names:
        for sub in ("images", "masks"):
            link = folder / "train" / sub / name
            if not link.exists():
                link.symlink_to(DATA / "jsrt-lungs" / "train" / sub / name)
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--out", default=str(ROOT / "trained_models" / "reproduce"))
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = {"commit": commit(), "date": time.strftime("%Y-%m-%d"), "parts": {}}
    path = out / f"reproduced-{report['commit']}.json"
    for part in args.parts:
        if part == "lung":
            report["parts"][part] = {f"seed{s}": quality(str(DATA / "lung-ct-64"), 64, 10, s,
                                                         out / f"lung-64-seed{s}")
                                     for s in (0, 1)}
        elif part == "jsrt":
            report["parts"][part] = {f"seed{s}": quality(str(DATA / "jsrt-lungs"), 128, 10, s,
                                                         out / f"jsrt-128-seed{s}")
                                     for s in (0, 1)}
        elif part == "jsrt256":
            report["parts"][part] = {"seed0": quality(str(DATA / "jsrt-lungs"), 256, 20, 0,
                                                      out / "jsrt-256-seed0")}
        elif part == "small":
            folder = small_set(out)
            run_folder = out / "jsrt-first50-128"
            run([sys.executable, "main.py", "--data", folder, "--image-size", 128,
                 "--max-minutes", 10, "--out", run_folder])
            report["parts"][part] = run_share(run_folder)
        elif part == "demo":
            run_folder = out / "demo"
            run([sys.executable, "main.py", "--out", run_folder])
            state = torch.load(run_folder / "last.pt", weights_only=True)
            report["parts"][part] = {**run_share(run_folder), "best_val_iou": state["best_iou"]}
        elif part == "organs64":
            run_folder = out / "organs-64-seed0"
            run([sys.executable, "main.py", "--data", DATA / "jsrt-organs", "--image-size", 64,
                 "--max-minutes", 10, *ORGANS, "--out", run_folder])
            run([sys.executable, "evaluate.py", "--checkpoint", run_folder / "best_iou.pt",
                 "--data", DATA / "jsrt-organs", "--split", "test"])
            metrics = json.loads((run_folder / "eval-best_iou" / "metrics.json").read_text())
            report["parts"][part] = {**run_share(run_folder), "metrics": metrics["metrics"],
                                     "per_class": metrics["per_class"],
                                     "uncertainty": metrics["uncertainty"],
                                     "ece": metrics["calibration"]["ece"]}
        elif part == "organs":
            report["parts"][part] = {"seed0": quality(str(DATA / "jsrt-organs"), 128, 10, 0,
                                                      out / "organs-128-seed0", ORGANS)}
        path.write_text(json.dumps(report, indent=2))   # after every part: nothing is lost

    print(f"\nresults of {report['commit']}, {report['date']} (wrote {path})\n")
    print("| run | model | Dice | IoU | HD95 px | AUROC | ECE | DDIM steps | validation share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for part, seeds in report["parts"].items():
        if part in ("small", "demo", "organs64"):
            continue
        for seed, r in seeds.items():
            share = r["ddpm_run"]["validation_share"]
            for name, m in r["results"].items():
                steps = r["steps"] if "K=1" in name else r.get("ensemble_steps", r["steps"])
                print(f"| {part} {seed} | {name} | {m['dice']:.4f} | {m['iou']:.4f} | "
                      f"{m['hd95']:.2f} | {m.get('auroc', float('nan')):.3f} | "
                      f"{m.get('ece', float('nan')):.4f} | "
                      f"{steps if 'DDPM' in name else ''} | "
                      f"{f'{share:.0%}' if 'DDPM' in name and share is not None else ''} |")
    for part in ("small", "demo", "organs64"):
        if part in report["parts"]:
            print(f"{part}: {report['parts'][part]}")


if __name__ == "__main__":
    main()
