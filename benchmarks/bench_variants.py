"""Training variants side by side at the same number of optimiser steps, scored on the
validation split the runs held back: Dice of one sample and of a K=5 ensemble, and the
ensemble's uncertainty (pixel-error AUROC, entropy on wrong and right pixels) and ECE.

    python benchmarks/bench_variants.py --data ../shared/data/lung-ct-64 --image-size 64 \\
        --steps 800 --parallel 2 --variants "x0=" "eps=--prediction eps" \\
        "selfcond=--self-condition" --seeds 0 1

Each variant is `name=main.py flags` on top of the defaults (the rules by image size
included). Runs are bounded by steps (no time limit, no early stop) like bench_shift.py,
so --parallel N runs N at once, each pinned to one CPU, without changing the figures. Each
best_iou.pt is then scored by evaluate.evaluate on the val split with the DDIM steps the
run chose at its end (for one sample, and for the ensemble, mirrored as evaluate.py's
--mirror auto). Choosing defaults on val keeps
the test split for the final comparison. Prints a table and writes JSON beside the runs.
"""
import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_shift import finished, run_all  # noqa: E402
from diagnose_uncertainty import evaluate_args  # noqa: E402
from evaluate import evaluate, scored_dataset  # noqa: E402
from utils import load_checkpoint, read_checkpoint, stored_sample_steps  # noqa: E402

OWN_FLAGS = ("--data", "--image-size", "--max-steps", "--max-minutes", "--seed", "--min-steps",
             "--out", "--resume")


def score_on_val(run, ensemble, seed):
    model, diffusion, cfg = load_checkpoint(run / "best_iou.pt")
    state = read_checkpoint(run / "best_iou.pt")
    val = scored_dataset(cfg, evaluate_args(run / "best_iou.pt", None, "val"))
    row = {"steps": stored_sample_steps(state, 1, diffusion),
           "ensemble_steps": stored_sample_steps(state, ensemble, diffusion),
           "best_step": state["step"], "best_val_iou": state["val_iou"]}   # the kept weights'
    mirror = cfg.trained_mirrored()   # as evaluate.py's --mirror auto
    for k in (1, ensemble):
        m = evaluate(model, diffusion, val, run / f"eval-val-k{k}",
                     steps=stored_sample_steps(state, k, diffusion), ensemble=k, seed=seed,
                     mirror=mirror)
        row[f"dice_k{k}"] = m["metrics"]["dice"]["mean"]
        if k > 1:
            u = m["uncertainty"]
            row.update(auroc=u["auroc_for_pixel_error"], entropy_wrong=u["mean_on_wrong_pixels"],
                       entropy_right=u["mean_on_right_pixels"], ece=m["calibration"]["ece"])
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=800, help="optimiser steps per run")
    parser.add_argument("--variants", nargs="+", required=True, help='"name=main.py flags"')
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--ensemble", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    variants = dict(v.split("=", 1) for v in args.variants)
    for name, flags in variants.items():
        own = [f for f in shlex.split(flags) if f.split("=")[0] in OWN_FLAGS]
        if own:
            parser.error(f"{name}: {', '.join(own)} set by the benchmark itself")
    if args.parallel > 1 and not shutil.which("taskset"):
        parser.error("--parallel needs taskset (util-linux) to pin each run to a CPU")
    args.data = str(Path(args.data).resolve())
    out = Path(args.out or ROOT / "trained_models" / "bench_variants"
               / f"{Path(args.data).name}-{args.image_size}-{args.steps}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs, flags = {}, {}
    for name, extra in variants.items():
        for seed in args.seeds:
            key = (name, seed)
            runs[key] = out / f"{name}-seed{seed}"
            flags[key] = ["--data", args.data, "--image-size", str(args.image_size),
                          "--max-steps", str(args.steps), "--min-steps", str(args.steps),
                          "--max-minutes", "0", "--seed", str(seed), "--out", str(runs[key]),
                          *shlex.split(extra)]
    todo = [k for k in runs if not finished(runs[k], flags[k], args.steps)]
    run_all(todo, flags, runs, args.parallel, out)

    rows = {f"{name}-seed{seed}": score_on_val(runs[(name, seed)], args.ensemble, seed)
            for name, seed in runs}
    print(f"\n{Path(args.data).name} at {args.image_size} px, {args.steps} steps; val split, "
          f"K={args.ensemble}")
    print(f"{'variant':22s} {'steps':>6s} {'Dice K=1':>8s} {f'K={args.ensemble}':>8s} "
          f"{'AUROC':>6s} {'H wrong':>7s} {'H right':>7s} {'ECE':>7s}")
    for name, r in rows.items():
        steps = f"{r['steps']}/{r['ensemble_steps']}"   # for one sample / the ensemble
        print(f"{name:22s} {steps:>6s} {r['dice_k1']:8.4f} {r[f'dice_k{args.ensemble}']:8.4f} "
              f"{r['auroc']:6.3f} {r['entropy_wrong']:7.3f} {r['entropy_right']:7.3f} "
              f"{r['ece']:7.4f}")
    means = {name: {k: float(np.mean([rows[f"{name}-seed{s}"][k] for s in args.seeds]))
                    for k in ("dice_k1", f"dice_k{args.ensemble}", "auroc")}
             for name in variants}
    if len(args.seeds) > 1:
        print("means over seeds: " + "; ".join(
            f"{n} {m['dice_k1']:.4f} / {m[f'dice_k{args.ensemble}']:.4f} / AUROC {m['auroc']:.3f}"
            for n, m in means.items()))
    (out / "results.json").write_text(json.dumps(
        {"data": args.data, "image_size": args.image_size, "steps": args.steps,
         "variants": variants, "seeds": args.seeds, "runs": rows, "means": means,
         "torch_threads": torch.get_num_threads()}, indent=2))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
