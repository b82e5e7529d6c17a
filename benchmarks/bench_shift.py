"""How the noise schedule shift changes what DDPM-v2 learns in a fixed number of steps.

    python benchmarks/bench_shift.py --data ../shared/data/jsrt-lungs --image-size 128 \
        --steps 400 --val-every 100 --shifts 1 2 4 8 16 32 --parallel 2

Trains `main.py --schedule-shift S` for each S, the same data, seed and number of optimiser
steps (no time limit and no early stop), validating every --val-every steps, and reads each
run's EMA val IoU (one sample, --eval-steps DDIM steps) from its metrics.csv. --score
also scores each best_iou.pt on the test split (one sample, 25 DDIM steps, threshold 0.5).

--parallel N runs N trainings at once, each pinned to its own CPU with taskset (one torch
thread each), which on a small CPU machine finishes a sweep sooner than one at a time with
all threads; the steps, not the clock, bound each run, so the figures do not depend on
it. A run folder that already holds a finished run of the same config is read, not
retrained (--retrain to force). Further main.py flags go after a `--`. Prints a table and
writes JSON beside the runs.
"""
import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import main as launcher  # noqa: E402
from train_targets import test_scores  # noqa: E402
from utils import read_checkpoint  # noqa: E402

# config keys a finished run may differ in and still count: where and how it ran, and the
# patience, which cannot have mattered to a run that reached its last step
IGNORED_ON_REUSE = ("out", "resume", "nproc", "num_workers", "log_every", "patience",
                    "auto_fields")
# left at 0, train() fills these by rule (utils.run_length_defaults) and stores the value
RULE_FILLED = ("val_every", "patience", "min_steps")
# flags the sweep sets itself
OWN_FLAGS = ("--data", "--image-size", "--max-steps", "--val-every", "--max-minutes", "--seed",
             "--patience", "--min-steps", "--schedule-shift", "--out", "--resume")


def val_curve(run):
    """{step: val IoU} from a run folder's metrics.csv."""
    with open(run / "metrics.csv") as f:
        return {int(r["step"]): float(r["val_iou"]) for r in csv.DictReader(f) if r["val_iou"]}


def main_flags(args, shift, run):
    return ["--data", args.data, "--image-size", str(args.image_size), "--max-steps",
            str(args.steps), "--val-every", str(args.val_every), "--max-minutes", "0",
            "--seed", str(args.seed), "--min-steps", str(args.steps),   # no early stop
            "--schedule-shift", f"{shift:g}", "--out", str(run), *args.flags]


def finished(run, flags, steps):
    """True when `run` holds a run of `flags` (same config, where-and-how flags aside) that
    validated at `steps`."""
    if not (run / "last.pt").is_file() or not (run / "metrics.csv").is_file():
        return False
    stored = read_checkpoint(run / "last.pt")["config"]
    wanted = launcher.parse_args(flags)[0].to_dict()
    if stored["data"]:                                        # main.py ran in the repo root
        stored["data"] = str((ROOT / stored["data"]).resolve())
    by_rule = {k for k in RULE_FILLED if not wanted[k]}   # train() stored the value it chose
    differ = [k for k in wanted if k not in IGNORED_ON_REUSE and k not in by_rule
              and stored.get(k) != wanted[k]]
    return not differ and max(val_curve(run), default=0) >= steps


def launch(flags, run, cpu):
    if run.exists():   # another config or an unfinished run: main.py would refuse the folder
        print(f"replacing {run}")
        shutil.rmtree(run)
    cmd = [sys.executable, "main.py", *flags]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    print(" ".join(cmd), flush=True)
    with open(run.parent / f"{run.name}.log", "w") as log:   # the child keeps its own copy
        return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def run_all(todo, flags, runs, parallel, out):
    """Train the runs keyed in `todo` (main.py `flags[key]` into `runs[key]`), `parallel` at
    a time, each pinned to its own CPU (one at a time, unpinned, for parallel 1)."""
    todo = list(todo)
    cpus = sorted(os.sched_getaffinity(0))[:parallel] if parallel > 1 else [None]
    running = {}                                                    # process -> its CPU
    try:
        while todo or running:
            for cpu in [c for c in cpus if c not in running.values()][:len(todo)]:
                key = todo.pop(0)
                running[launch(flags[key], runs[key], cpu)] = cpu
            time.sleep(2)
            for proc in [p for p in running if p.poll() is not None]:
                if proc.returncode:
                    raise SystemExit(f"a run failed: {' '.join(proc.args)}; see its log in {out}")
                del running[proc]
    finally:   # a failure or Ctrl-C ends the other runs too
        for proc in running:
            proc.terminate()
            proc.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=400, help="optimiser steps per run")
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--shifts", type=float, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parallel", type=int, default=1,
                        help="runs at once, each pinned to one CPU; 1 = one at a time, all CPUs")
    parser.add_argument("--score", action="store_true", help="also score best_iou.pt on test")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("flags", nargs=argparse.REMAINDER,
                        help="further main.py flags, after a --")
    args = parser.parse_args()
    args.flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    own = [f for f in args.flags if f.split("=")[0] in OWN_FLAGS]
    if own:
        parser.error(f"{', '.join(own)}: set by the sweep itself (see its own flags)")
    if args.parallel > 1 and not shutil.which("taskset"):
        parser.error("--parallel needs taskset (util-linux) to pin each run to a CPU")
    args.data = str(Path(args.data).resolve())   # main.py runs in the repo root
    args.shifts = list(dict.fromkeys(args.shifts))
    name = Path(args.data).name
    out = Path(args.out or ROOT / "trained_models" / "bench_shift" / f"{name}-{args.image_size}")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs = {s: out / f"shift{s:g}" for s in args.shifts}

    flags = {s: main_flags(args, s, runs[s]) for s in args.shifts}
    todo = [s for s in args.shifts
            if args.retrain or not finished(runs[s], flags[s], args.steps)]
    run_all(todo, flags, runs, args.parallel, out)

    marks = sorted(val_curve(runs[args.shifts[0]]))[-4:]     # the last four validations
    rows = {}
    for s in args.shifts:
        curve = val_curve(runs[s])
        best_step = max(curve, key=curve.get)
        row = {"val_iou": {e: curve.get(e) for e in marks},
               "best_val_iou": curve[best_step], "best_step": best_step}
        if args.score:
            dice, iou, n = test_scores(runs[s] / "best_iou.pt", args.data)
            row.update(test_dice=dice, test_iou=iou, test_images=n)
        rows[f"{s:g}"] = row

    print(f"\n{name} at {args.image_size} px, {args.steps} steps, seed {args.seed}; "
          f"EMA val IoU (one sample, DDIM) at step")
    head = f"{'shift':>6s} " + " ".join(f"{e:>7d}" for e in marks) + f" {'best (step)':>15s}"
    print(head + ("  test Dice  test IoU" if args.score else ""))
    for s, r in rows.items():
        line = (f"{s:>6s} " + " ".join(f"{r['val_iou'][e]:7.4f}" if r["val_iou"][e] is not None
                                       else f"{'-':>7s}" for e in marks)
                + f" {r['best_val_iou']:7.4f} ({r['best_step']:5d})")
        if args.score:
            line += f"  {r['test_dice']:9.4f} {r['test_iou']:9.4f}"
        print(line)
    report = {"data": args.data, "image_size": args.image_size, "steps": args.steps,
              "seed": args.seed, "flags": args.flags, "parallel": args.parallel, "runs": rows}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
