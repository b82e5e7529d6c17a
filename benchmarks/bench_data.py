"""Loader throughput: images/s that `make_loader` delivers from a real folder, per image size
and worker count, with training augmentation on. Not a test: later issues hold training to
"the loader is never the bottleneck", and this is the number to hold it to.

    python benchmarks/bench_data.py                  # jsrt-lungs, 64 and 256 px, 0/1/2 workers
    python benchmarks/bench_data.py --data DIR --sizes 128 --workers 0 4 --out -

"steady" counts epochs after the first (workers already running, files in the page cache);
"first epoch" includes starting the workers.
"""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataset import ContourDataset, available_cpus, make_loader  # noqa: E402


def time_loader(dataset, batch_size, workers, epochs):
    """(first-epoch images/s, steady images/s over the remaining epochs)."""
    loader = make_loader(dataset, batch_size, train=True, num_workers=workers, seed=0)
    rates = []
    for _ in range(epochs):
        start, images = time.perf_counter(), 0
        for image, contour in loader:
            images += image.shape[0]                              # (B, C, S, S)
        rates.append(images / (time.perf_counter() - start))
    del loader  # stop persistent workers before the next configuration starts its own
    steady = len(rates[1:]) / sum(1 / r for r in rates[1:]) if epochs > 1 else rates[0]
    return rates[0], steady


def bench(data, split, sizes, workers, batch_size, epochs, augment):
    start = time.perf_counter()
    ContourDataset(data, split, image_size=sizes[0])
    scan_s = time.perf_counter() - start
    rows = []
    for size in sizes:
        dataset = ContourDataset(data, split, image_size=size, augment=augment)
        for num_workers in workers:
            first, steady = time_loader(dataset, batch_size, num_workers, epochs)
            rows.append({"image_size": size, "workers": num_workers,
                         "images_per_s": round(steady, 1),
                         "first_epoch_images_per_s": round(first, 1)})
            print(f"  {size:>4} px  {num_workers} workers  {steady:8.1f} images/s "
                  f"(first epoch {first:.1f})", flush=True)
    return {"data": str(data), "split": split, "pairs": len(dataset), "augment": augment,
            "batch_size": batch_size, "epochs": epochs, "scan_seconds": round(scan_s, 3),
            "cpus": available_cpus(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "results": rows}


def print_table(report):
    print(f"\n{report['data']} ({report['split']}, {report['pairs']} pairs, batch "
          f"{report['batch_size']}, augment={report['augment']}, {report['cpus']} CPUs); "
          f"scan {report['scan_seconds']:.2f} s")
    workers = sorted({r["workers"] for r in report["results"]})
    print("images/s (steady)  " + "".join(f"{w} workers".rjust(12) for w in workers))
    for size in sorted({r["image_size"] for r in report["results"]}):
        cells = {r["workers"]: r["images_per_s"]
                 for r in report["results"] if r["image_size"] == size}
        print(f"{size:>6} px          " + "".join(f"{cells[w]:12.1f}" for w in workers))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / ".." / "shared" / "data" / "jsrt-lungs",
                        help="a ContourDataset folder")
    parser.add_argument("--split", default="train",
                        help="split to read ('none' for a flat folder)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="image sizes")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size")
    parser.add_argument("--epochs", type=int, default=4, help="passes per configuration (>= 2)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="training augmentation")
    parser.add_argument("--out", default=str(ROOT / "trained_models" / "bench_data.json"),
                        help="JSON report path; '-' prints only")
    args = parser.parse_args(argv)
    split = None if args.split.lower() == "none" else args.split
    report = bench(args.data.resolve(), split, args.sizes, args.workers, args.batch_size,
                   args.epochs, args.augment)
    print_table(report)
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
