"""A model, not a measurement: where data-parallel training of DDPM-v2 stops scaling.

    python benchmarks/scaling_model.py                       # the default unet2d, bf16 compute
    python benchmarks/scaling_model.py --tflops 200 --batch-per-gpu 32

Measured here: the parameter count (so the gradient bytes DDP all-reduces every step) and
the FLOPs of one forward pass at each image size (torch.utils.flop_counter, model.py's
estimate_flops). Assumed (flags): the GPU's achieved throughput (--tflops, default 100
TFLOP/s: about 10% of an H100's dense bf16 peak, a guess for a 2.75 M-parameter UNet at
small batches) and the bus bandwidths of the links. A training step is taken as 3 forward
passes of FLOPs per image (forward + backward), the gradient all-reduce as a ring:
2 (N - 1) / N x bytes / bandwidth + 2 (N - 1) x latency. Efficiency is bracketed: with no
overlap of communication and backward, compute / (compute + all-reduce); with perfect
overlap (DDP's buckets at best), compute / max(compute, all-reduce).
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import main as launcher  # noqa: E402
from model import count_parameters, estimate_flops  # noqa: E402
from utils import build_model_and_diffusion  # noqa: E402

# (name, bus bandwidth GB/s, per-hop latency us): NCCL-style achievable figures, not peaks
LINKS = (("NVLink (H100 SXM, in a node)", 400.0, 5.0),
         ("PCIe 4.0 x16 (no NVLink)", 20.0, 10.0),
         ("100 Gb Ethernet (between nodes)", 10.0, 30.0))


def allreduce_ms(nbytes, gpus, bandwidth_gbs, latency_us):
    if gpus == 1:
        return 0.0
    ring = 2 * (gpus - 1) / gpus * nbytes / (bandwidth_gbs * 1e9)
    return 1e3 * (ring + 2 * (gpus - 1) * latency_us * 1e-6)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tflops", type=float, default=100.0,
                        help="achieved TFLOP/s per GPU (an assumption)")
    parser.add_argument("--batch-per-gpu", type=int, default=0,
                        help="images per GPU per step; 0 = the size rule's global batch")
    parser.add_argument("--grad-bytes", type=int, default=4, help="bytes per gradient (fp32)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--gpus", type=int, nargs="+", default=[2, 8, 32])
    args = parser.parse_args()
    print("| image px | batch / GPU | compute ms / step | GPUs | link | all-reduce ms | "
          "efficiency, no overlap | with full overlap |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        cfg, _ = launcher.parse_args(["--image-size", str(size)])
        model, _ = build_model_and_diffusion(cfg.to_dict())
        nbytes = count_parameters(model) * args.grad_bytes
        batch = args.batch_per_gpu or cfg.batch_size
        compute = 1e3 * 3 * estimate_flops(model, size) * batch / (args.tflops * 1e12)
        for gpus in args.gpus:
            for name, bandwidth, latency in LINKS:
                if gpus > 8 and "between nodes" not in name:
                    continue    # more than one 8-GPU node: the network between them decides
                comm = allreduce_ms(nbytes, gpus, bandwidth, latency)
                print(f"| {size} | {batch} | {compute:.2f} | {gpus} | {name} | {comm:.2f} | "
                      f"{compute / (compute + comm):.0%} | {min(1.0, compute / comm):.0%} |")
    print(f"\nparameters {count_parameters(model):,}; gradient bytes per step {nbytes / 2**20:.1f} "
          f"MiB; assumed {args.tflops:g} TFLOP/s per GPU")


if __name__ == "__main__":
    main()
