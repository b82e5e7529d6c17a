"""Training-step throughput and model-FLOPs utilisation (MFU) of the backbones.

    python benchmarks/bench_train.py                          # CPU, fp32, 64/128/256 px
    python benchmarks/bench_train.py --configs default convnext_tiny resnet18 --sizes 64
    python benchmarks/bench_train.py --device cuda --sizes 256 --amp bf16 fp16 --compile both

A step is what train() does: forward, MSE backward, AdamW step and EMA update, on random
data of the right shape. MFU = 3 x forward FLOPs (model.estimate_flops) x images/s, divided
by the device's dense peak measured in the same run by a large matmul in the same dtype
(and, on CUDA, also by the card's data-sheet figure where known). With --peer, also times
lucidrains' med-seg-diff-pytorch Unet(dim=32, dim_mults=(1, 2, 4, 8)) when that package is
installed (it is not a dependency; the column is skipped otherwise), in fp32 and without
an EMA update, which only flatters the peer.
"""
import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import build_model, count_parameters, estimate_flops  # noqa: E402
from train_utils import EMA  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# dense tensor-core peaks from NVIDIA's data sheets, FLOP/s
DATASHEET_PEAKS = {"H100 SXM": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
                   "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12},
                   "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
                   "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}}
# name -> (model.MODELS entry, its options)
CONFIGS = {"default": ("unet2d", {}),
           "base32": ("unet2d", {"base_channels": 32}),  # the peer's width and levels: dim 32, (1, 2, 4, 8)
           "large": ("unet2d", {"base_channels": 32, "num_res_blocks": 2}),  # two blocks per level, 15.9 M
           "convnext_tiny": ("convnext_tiny", {}),       # torchvision encoders, UNet decoder
           "resnet18": ("resnet18", {})}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype, n=4096, seconds=1.0):
    """Achieved FLOP/s of an n x n matmul in `dtype`: the dense peak MFU is measured against."""
    if device.type == "cpu":
        n = 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    synchronize(device)
    return 2 * n ** 3 * count / (time.perf_counter() - start)


def datasheet_peak(dtype_name):
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peaks in DATASHEET_PEAKS.items():
        if all(word in name for word in key.split()):
            return key, peaks[dtype_name]
    return None


def time_steps(step, device, warmup, seconds):
    for _ in range(warmup):
        step()
    synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 3:
        step()
        count += 1
    synchronize(device)
    return (time.perf_counter() - start) / count


def model_step(size, batch, device, dtype, compile, channels_last, config):
    name, opts = config
    model = build_model(name, in_channels=2, out_channels=1, **opts).to(device)
    flops = estimate_flops(model, size)
    params = count_parameters(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, 0.999)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    net = torch.compile(model) if compile else model
    x = torch.randn(batch, 2, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (batch,), device=device)
    target = torch.randn(batch, 1, size, size, device=device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    counter = {"n": 0}

    def step():
        with autocast:
            loss = F.mse_loss(net(x, t).float(), target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        counter["n"] += 1
        ema.update(model, counter["n"])
    return step, flops, params


def peer_step(size, batch, device):
    """lucidrains' MedSegDiff Unet, if installed: same step (forward, MSE, AdamW)."""
    try:
        from med_seg_diff_pytorch import Unet
    except ImportError:
        return None
    model = Unet(dim=32, image_size=size, mask_channels=1, input_img_channels=1,
                 dim_mults=(1, 2, 4, 8)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, size, size, device=device)
    cond = torch.randn(batch, 1, size, size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)

    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x[:1], t[:1], cond[:1])

    def step():
        loss = F.mse_loss(model(x, t, cond), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step, count_parameters(model), counter.get_total_flops()


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--batch", type=int, default=None,
                        help="images per step (default: 16 on CPU, 64 on CUDA)")
    parser.add_argument("--amp", nargs="+", default=None, choices=list(DTYPES),
                        help="dtypes to time (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--compile", default="off", choices=("off", "on", "both"))
    parser.add_argument("--configs", nargs="+", default=["default"], choices=list(CONFIGS))
    parser.add_argument("--peer", action="store_true",
                        help="also time med-seg-diff-pytorch's Unet at 64 px if installed")
    parser.add_argument("--seconds", type=float, default=5.0, help="timing window per row")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    batch = args.batch or (64 if device.type == "cuda" else 16)
    dtypes = args.amp or (["bf16"] if device.type == "cuda" else ["fp32"])
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    channels_last = device.type == "cuda"        # NHWC is slower for CPU convolutions
    peaks = {name: matmul_peak(device, DTYPES[name]) for name in dtypes}
    rows = []
    for config_name in args.configs:
        for size in args.sizes:
            for name in dtypes:
                for compile in compiles:
                    step, flops, params = model_step(size, batch, device, DTYPES[name], compile,
                                                    channels_last, CONFIGS[config_name])
                    seconds = time_steps(step, device, warmup=5 if compile else 2,
                                         seconds=args.seconds)
                    images_per_s = batch / seconds
                    achieved = 3 * flops * images_per_s
                    row = {"model": config_name, "params": params, "size": size,
                           "dtype": name, "compile": compile, "batch": batch,
                           "images_per_s": images_per_s, "forward_gflops": flops / 1e9,
                           "achieved_tflops": achieved / 1e12,
                           "measured_peak_tflops": peaks[name] / 1e12,
                           "mfu_measured_peak": achieved / peaks[name]}
                    sheet = datasheet_peak(name) if device.type == "cuda" else None
                    if sheet:
                        row["datasheet"] = sheet[0]
                        row["mfu_datasheet"] = achieved / sheet[1]
                    rows.append(row)
                    print(f"{config_name:13s} {size:4d}px {name:5s} compile={compile!s:5s} "
                          f"{images_per_s:9.1f} img/s  MFU {row['mfu_measured_peak']:.1%}",
                          flush=True)
    peer = None
    if args.peer:
        made = peer_step(64, batch, device)
        if made is None:
            print("med-seg-diff-pytorch is not installed: peer column skipped")
        else:
            step, params, flops = made
            images_per_s = batch / time_steps(step, device, 2, args.seconds)
            peer = {"params": params, "size": 64, "forward_gflops": flops / 1e9,
                    "images_per_s": images_per_s,
                    "mfu_measured_peak": (3 * flops * images_per_s / peaks["fp32"]
                                          if "fp32" in peaks else None)}

    print(f"\n{'model':13s} {'params':>7s} {'size':>5s} {'dtype':>5s} {'compile':>7s} "
          f"{'img/s':>9s} {'TFLOP/s':>8s} {'peak':>7s} {'MFU':>6s}")
    for r in rows:
        print(f"{r['model']:13s} {r['params'] / 1e6:6.2f}M {r['size']:5d} {r['dtype']:>5s} "
              f"{r['compile']!s:>7s} {r['images_per_s']:9.1f} {r['achieved_tflops']:8.3f} "
              f"{r['measured_peak_tflops']:7.2f} {r['mfu_measured_peak']:6.1%}"
              + (f"  ({r['mfu_datasheet']:.1%} of {r['datasheet']} data sheet)"
                 if "mfu_datasheet" in r else ""))
    if peer:
        ours = [r for r in rows if r["size"] == 64]
        print(f"med-seg-diff Unet {peer['params'] / 1e6:.1f}M, {peer['forward_gflops']:.2f} "
              f"GFLOPs at 64 px: {peer['images_per_s']:.1f} img/s"
              + (f", MFU {peer['mfu_measured_peak']:.1%}" if peer["mfu_measured_peak"] else "")
              + "; ours: "
              + ", ".join(f"{r['model']} {r['images_per_s'] / peer['images_per_s']:.2f}x"
                          for r in ours))
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "rows": rows, "peer": peer}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
