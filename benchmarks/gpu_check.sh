#!/usr/bin/env bash
# One script for a session lent a GPU (about 5 minutes on an H100): the GPU tests, training
# throughput and MFU at 256 px (bf16 and fp16, with and without torch.compile), and a 2-epoch
# fp16 run of main.py on jsrt-lungs at 128 px showing finite losses and the GradScaler at work.
# Results go to $OUT (default /tmp/gpu_check).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check}
data=${DATA:-../shared/data/jsrt-lungs}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

python -m pytest -q -m gpu tests/ 2>&1 | tee "$out/pytest_gpu.txt"
python benchmarks/bench_train.py --device cuda --sizes 256 --amp bf16 fp16 --compile both \
    --json "$out/bench_train_cuda.json" 2>&1 | tee "$out/bench_train_cuda.txt"
python main.py --data "$data" --image-size 128 --epochs 2 --amp fp16 --log-every 5 \
    --out "$out/jsrt-fp16" 2>&1 | tail -n 5
python - "$out/jsrt-fp16" <<'PY'
import csv, math, sys, torch
run = sys.argv[1]
rows = list(csv.DictReader(open(f"{run}/metrics.csv")))
losses = [float(r["loss"]) for r in rows if r["loss"]]
state = torch.load(f"{run}/last.pt", weights_only=True)
print(f"jsrt-lungs 128 px fp16: {len(losses)} logged losses, all finite: "
      f"{all(math.isfinite(x) for x in losses)}, first {losses[0]:.4f}, last {losses[-1]:.4f}; "
      f"GradScaler scale {state['scaler']['scale']:g}, skipped steps {state['skipped_steps']}; "
      f"val IoU {state['val_iou']:.4f}")
PY
