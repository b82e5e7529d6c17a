"""Launch DDPM-v2 training: one process per GPU, or CPU processes when there is no GPU.

    python main.py                                   # synthetic contours, every local GPU
    python main.py --data DIR --image-size 128       # your image/mask folder
    torchrun --standalone --nproc_per_node=2 main.py --data DIR
    python main.py --nproc 2                         # two CPU processes (gloo) on a CPU box
    torchrun --nnodes 2 --node-rank R --master-addr HOST --master-port P --nproc-per-node G \
        --max-restarts 3 main.py --data DIR --out SHARED/run --resume auto     # on each node

Several nodes: one job, every process a rank; the run folder must be on a file system all
nodes see (rank 0 writes it). With `--resume auto` from the start, a restarted job (torchrun
--max-restarts, or SLURM's requeue) continues from last.pt; see scripts/train_multinode.sbatch.

Every field of TrainConfig (utils.py) is a --kebab-case flag; `--help` lists them.
"""
import argparse
import dataclasses
import os
import socket
import sys
import traceback
from typing import get_args, get_origin

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dataset import DatasetError, available_cpus
from train_utils import NonFiniteLossError, RunFolderError, train
from utils import (UNET_KEYS, CheckpointError, TrainConfig, data_defaults, print0,
                   resume_config)


def build_parser():
    parser = argparse.ArgumentParser(
        description="Train DDPM-v2, a diffusion model that generates segmentation masks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = dict(default=default, help=f.metadata["help"])
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.type is tuple:
            parser.add_argument(flag, type=f.metadata.get("item", int), nargs="+",
                                **{**kw, "default": list(default)})
        else:
            # Optional[str] -> str
            kind = next(a for a in get_args(f.type) if a is not type(None)) \
                if get_origin(f.type) is not None else f.type
            parser.add_argument(flag, type=kind, choices=f.metadata.get("choices"), **kw)
    return parser


def parse_args(argv=None):
    """(config, names of the fields given on the command line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # a second parse with every default suppressed tells which flags were typed
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    explicit = set(vars(parser.parse_args(argv)))
    unet_only = sorted(explicit & set(UNET_KEYS))
    if args.model != "unet2d" and unet_only:
        parser.error(f"{', '.join('--' + k.replace('_', '-') for k in unet_only)} set(s) "
                     f"unet2d's shape; --model {args.model} builds with its own defaults")
    try:
        return data_defaults(TrainConfig(**vars(args)), explicit), explicit
    except (ValueError, DatasetError) as e:   # flags that do not fit: one line, no traceback
        parser.error(str(e))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(backend):
    """dist.init_process_group from the environment; after a torchrun restart, on keys of
    this attempt only: the store can still hold the failed attempt's (a dead worker's gloo
    address), which the new workers would otherwise try to connect to."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if not restart:
        dist.init_process_group(backend)
        return
    store, rank, world_size = next(dist.rendezvous("env://"))
    dist.init_process_group(backend, store=dist.PrefixStore(f"ddpm_restart_{restart}", store),
                            rank=rank, world_size=world_size)


def worker(local_rank, world_size, cfg, explicit, port):
    """One training process. Serves mp.spawn (port given) and torchrun (env already set).
    Returns train()'s TrainResult."""
    if port is not None:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                          RANK=str(local_rank), LOCAL_RANK=str(local_rank),
                          WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # before init_process_group, so NCCL picks it up
        backend = "nccl"
    else:
        device = torch.device("cpu")
        # OMP_NUM_THREADS wins (torchrun sets it to 1 for several local workers)
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0)
                              or max(1, available_cpus() // local_world))
        backend = "gloo"
    distributed = int(os.environ.get("WORLD_SIZE", world_size)) > 1
    try:
        if distributed:
            init_process_group(backend)
        cfg, checkpoint = resume_config(cfg, explicit)
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restarts:   # torchrun --max-restarts started this worker again after a failure
            print0(f"torchrun restart {restarts}: "
                   + (f"resuming from {checkpoint}" if checkpoint else
                      "nothing to resume (no last.pt yet, or no --resume auto): starting again"))
        print0("config:", cfg.to_dict())
        return train(cfg, resume_from=checkpoint, device=device)
    except (CheckpointError, FileExistsError, ValueError, RunFolderError,
            NonFiniteLossError) as e:
        # a user mistake: one clear line, no traceback wall
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    except Exception:
        # show the failing rank's own traceback: the launcher may report another rank's
        # follow-on error (a closed connection) first
        rank = os.environ.get("RANK", local_rank)
        print(f"[rank {rank}] failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        raise
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None):
    cfg, explicit = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:   # started by torchrun
        worker(int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]), cfg,
               explicit, port=None)
        return
    world_size = torch.cuda.device_count() if torch.cuda.is_available() else cfg.nproc
    if world_size <= 1:
        worker(0, 1, cfg, explicit, port=None)
    else:
        try:
            mp.spawn(worker, args=(world_size, cfg, explicit, free_port()), nprocs=world_size)
        except mp.ProcessExitedException as e:
            # the failed worker printed its own error; spawn has stopped the others
            raise SystemExit(e.exit_code if e.exit_code and e.exit_code > 0 else 1) from None


if __name__ == "__main__":
    main()
