"""The training loop and its launch: config, EMA, AMP, checkpoints, resume, early stopping,
multi-process runs (gloo) through mp.spawn and torchrun."""
import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import main
from conftest import TINY_FLAGS
from train_utils import EMA, TrainConfig, train
from utils import CheckpointError, Progress, load_checkpoint, resume_config

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_FLAGS


def tiny_cfg(out, **overrides):
    cfg, _ = main.parse_args(TINY + ["--out", str(out)])
    for k, v in {"epochs": 2, **overrides}.items():
        setattr(cfg, k, v)
    return cfg


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def step_losses(run):
    return {int(r["step"]): float(r["loss"]) for r in read_log(Path(run) / "metrics.csv")
            if r["loss"]}


def test_config_is_plain_and_round_trips(tmp_path):
    cfg = tiny_cfg(tmp_path)
    path = tmp_path / "c.pt"
    torch.save({"config": cfg.to_dict()}, path)
    loaded = torch.load(path, weights_only=True)["config"]
    assert TrainConfig.from_dict(loaded) == cfg
    with pytest.raises(ValueError, match="prediction"):
        TrainConfig(prediction="score")


def test_cli_flags_cover_config_and_track_explicit():
    cfg, explicit = main.parse_args(["--epochs", "3", "--channel-mults", "1", "2", "--no-augment"])
    assert cfg.epochs == 3 and cfg.channel_mults == (1, 2) and cfg.augment is False
    assert explicit == {"epochs", "channel_mults", "augment"}
    help_text = main.build_parser().format_help()
    for name in ("--max-minutes", "--eval-steps", "--ema-decay", "--resume", "--nproc",
                 "--model", "--mask-values", "--mask-suffix", "--allow-soft-masks",
                 "--mask-threshold", "--fit", "--test-fraction"):
        assert name in help_text
    assert "(default: 0.999)" in help_text


def test_ema_math():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.9, warmup=0)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model, step=1)
    assert torch.allclose(ema.model.weight, torch.full((1, 2), 0.9 * 1 + 0.1 * 3))
    assert not ema.model.weight.requires_grad
    warm = EMA(model, decay=0.999, warmup=10)
    assert warm.decay_at(0) == pytest.approx(0.1) and warm.decay_at(10 ** 6) == 0.999


def test_train_checkpoints_and_notebook_load(tmp_path):
    cfg = tiny_cfg(tmp_path / "run")
    result = train(cfg)
    run = Path(cfg.out)
    for name in ("last.pt", "best_iou.pt", "best_mse.pt", "metrics.csv"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in run.glob("samples_step*.png")) == [
        "samples_step0000004.png", "samples_step0000008.png"]
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 2 * 32 // 8
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])
    model, diffusion, config = load_checkpoint(run / "last.pt")
    ema_weights = result.ema_model.state_dict()
    assert all(torch.equal(v, ema_weights[k]) for k, v in model.state_dict().items())
    assert config == cfg and diffusion.num_timesteps == 50
    probs = diffusion.sample(model, torch.rand(2, 1, 16, 16), steps=2)
    assert probs.shape == (2, 1, 16, 16)
    assert result.samples.shape[1:] == (1, 16, 16) and result.contours.shape == result.samples.shape
    log = read_log(run / "metrics.csv")
    val_rows = [r for r in log if r["val_iou"]]
    assert [(int(r["epoch"]), int(r["step"])) for r in val_rows] == [(1, 4), (2, 8)]
    # the log, the returned Progress and the checkpoints tell one story
    ious = [float(r["val_iou"]) for r in val_rows]
    mses = [float(r["val_mse"]) for r in val_rows]
    assert ious[-1] == pytest.approx(result.progress.val_iou, rel=1e-5, abs=1e-9)
    assert state["val_iou"] == result.progress.val_iou
    best_iou = torch.load(run / "best_iou.pt", weights_only=True)
    assert best_iou["best_iou"] == pytest.approx(max(ious), rel=1e-5, abs=1e-9)
    # the latest weights within min_delta of the best val IoU, and that validation's IoU
    kept = max(i for i, iou in enumerate(ious) if iou >= max(ious) - cfg.min_delta)
    assert best_iou["step"] == int(val_rows[kept]["step"])
    assert best_iou["val_iou"] == pytest.approx(ious[kept], rel=1e-5, abs=1e-9)
    assert state["best_iou"] == best_iou["best_iou"] == result.progress.best_iou
    best_mse = torch.load(run / "best_mse.pt", weights_only=True)
    assert best_mse["best_mse"] == pytest.approx(min(mses), rel=1e-5)
    assert best_mse["step"] == int(val_rows[mses.index(min(mses))]["step"])


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path):
    full = tiny_cfg(tmp_path / "full", epochs=3, augment=True)
    train(full)
    part = tiny_cfg(tmp_path / "part", epochs=1, augment=True)
    train(part)
    cfg, explicit = main.parse_args(TINY + ["--out", part.out, "--resume", "auto", "--epochs", "3"])
    cfg, checkpoint = resume_config(cfg, explicit)
    assert checkpoint == Path(part.out) / "last.pt"
    train(cfg, resume_from=checkpoint)
    a, b = step_losses(full.out), step_losses(part.out)
    assert sorted(a) == sorted(b) and len(a) >= 9
    for s in a:
        assert a[s] == pytest.approx(b[s], abs=1e-6), s
    wa = torch.load(Path(full.out) / "last.pt", weights_only=True)
    wb = torch.load(Path(part.out) / "last.pt", weights_only=True)
    for k in wa["ema"]:
        assert torch.allclose(wa["ema"][k], wb["ema"][k], atol=1e-6), k


def test_early_stopping_fires_on_stagnant_metric(tmp_path):
    # a gain of 2 IoU is impossible, so every validation counts as stagnant
    cfg = tiny_cfg(tmp_path / "run", epochs=6, patience=8, min_steps=1, min_delta=2.0)
    result = train(cfg)
    assert result.progress.stopped_early and result.progress.epoch == 2


def test_best_checkpoint_follows_small_gains_patience_does_not():
    best = Progress()
    history = []
    cfg = TrainConfig(patience=250, min_steps=300)
    for step, (iou, mse) in zip(range(100, 800, 100), [(0.50, 0.3), (0.5004, 0.2),
                                                        (0.5008, 0.25), (0.5012, 0.1),
                                                        (0.49, 0.4), (0.5003, 0.3),
                                                        (0.5001, 0.3)]):
        best.step = step
        saves = best.record_validation(iou, mse, min_delta=1e-3, val_dice=iou + 0.1, steps=2)
        history.append(("best_iou.pt" in saves, "best_mse.pt" in saves, best.patience_step,
                        best.out_of_patience(cfg)))
    # every IoU gain saves; only the gain of 0.0012 over 0.50 (at step 400) restarts the
    # patience count, so only step 700 is 250 steps past a restart. After the best (0.5012),
    # best_iou.pt skips 0.49 and takes 0.5003, a tie within min_delta (the later weights),
    # not 0.5001, 0.0011 below the best
    assert history == [(True, True, 100, False), (True, True, 100, False),
                       (True, False, 100, False), (True, True, 400, False),
                       (False, False, 400, False), (True, False, 400, False),
                       (False, False, 400, True)]
    assert best.best_iou == 0.5012 and best.val_iou == 0.5001
    assert best.best_iou_dice == [2, 0.5003 + 0.1]   # the Dice of the weights it holds
    # stagnation: 250 steps after the last restart, and past min_steps, it stops
    assert best.out_of_patience(cfg)
    assert not best.out_of_patience(TrainConfig(patience=250, min_steps=1000))


def test_amp_bf16_path_runs_on_cpu(tiny_run, tmp_path):
    """The same one-epoch run as `tiny_run` (fp32 on the CPU) under bf16 autocast: same
    weights, batches, t and noise, so its losses differ from fp32's by bf16 rounding only."""
    cfg = tiny_cfg(tmp_path / "run", epochs=1, amp="bf16")
    result = train(cfg, device="cpu")
    losses, fp32 = step_losses(cfg.out), step_losses(tiny_run)
    assert sorted(losses) == sorted(fp32) == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    if not torch.cuda.is_available():                # else tiny_run ran bf16 on the GPU
        for step in fp32:
            assert losses[step] == pytest.approx(fp32[step], rel=1e-2), step
        assert losses != fp32                        # autocast really ran in bf16
    assert losses[4] < losses[1]                     # and it learns
    assert all(torch.isfinite(p).all() for p in result.ema_model.parameters())


@pytest.mark.slow
def test_different_model_shape_gives_clear_error(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", epochs=1)
    train(cfg)
    path = Path(cfg.out) / "last.pt"
    state = torch.load(path, weights_only=True)
    state["config"]["base_channels"] = 16    # config says one width, weights hold another
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "bad.pt")
    args = TINY + ["--out", cfg.out, "--resume", "auto", "--base-channels", "16"]
    with pytest.raises(CheckpointError, match="--base-channels 16"):
        resume_config(*main.parse_args(args))
    # and through the command line: one line on stderr, exit code 2, no traceback
    proc = subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr


def test_schedule_shift_travels_with_the_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", epochs=1, schedule_shift=2.0)
    train(cfg)
    path = Path(cfg.out) / "last.pt"
    _, diffusion, config = load_checkpoint(path)
    assert diffusion.shift == 2.0 and config.schedule_shift == 2.0
    # a checkpoint from before the flag has no such key: the published schedule, shift 1
    state = torch.load(path, weights_only=True)
    del state["config"]["schedule_shift"]
    torch.save(state, tmp_path / "old.pt")
    _, diffusion, config = load_checkpoint(tmp_path / "old.pt")
    assert diffusion.shift == 1.0 and config.schedule_shift == 1.0
    from utils import check_model_config
    check_model_config(state["config"], config.to_dict(), "old.pt")  # resumes: no clash
    with pytest.raises(CheckpointError, match="schedule_shift"):   # but shift 1 != shift 2
        check_model_config(torch.load(path, weights_only=True)["config"], config.to_dict(),
                           "last.pt")
    # the shift defines the diffusion, so a resume may not change it
    args = TINY + ["--out", cfg.out, "--resume", "auto", "--schedule-shift", "3"]
    with pytest.raises(CheckpointError, match="--schedule-shift 3"):
        resume_config(*main.parse_args(args))


def _spawned_rank(local_rank, world_size, cfg, port, result_dir):
    import main as launcher
    result = launcher.worker(local_rank, world_size, cfg, set(), port)
    # every field but the wall-clock ones, which each rank measures for itself
    record = {k: v for k, v in dataclasses.asdict(result.progress).items()
              if not k.endswith("_seconds")}
    Path(result_dir, f"rank{local_rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_two_process_gloo_ranks_agree(tmp_path):
    """The same worker `python main.py --nproc 2` spawns: both ranks hold the same
    all-reduced metrics and stop at the same epoch."""
    cfg = tiny_cfg(tmp_path / "run", epochs=4, patience=4, min_steps=1, min_delta=2.0)
    mp.spawn(_spawned_rank, args=(2, cfg, main.free_port(), str(tmp_path)), nprocs=2)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0 == r1
    assert r0["stopped_early"] and r0["epoch"] == 1


@pytest.mark.slow
def test_main_nproc2_cli(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "main.py", *TINY, "--nproc", "2", "--epochs", "2",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and len(state["rng"]) == 2
    assert state["config"]["nproc"] == 2


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "main.py", *TINY, "--epochs", "2",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and len(state["rng"]) == 2
    val_rows = [r for r in read_log(out / "metrics.csv") if r["val_iou"]]
    assert len(val_rows) == 2


@pytest.mark.slow
def test_two_torchrun_node_agents_train_the_one_node_job(tmp_path):
    """Two node agents on 127.0.0.1 (--nnodes 2, one CPU process each, gloo) train one job
    to the last.pt a single-node two-process run reaches with the same seed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}   # one thread per worker in both runs
    args = ["main.py", *TINY, "--epochs", "2", "--num-workers", "0"]
    one = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", *args, "--out", str(tmp_path / "one")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    port = str(main.free_port())
    logs = [open(tmp_path / f"agent{r}.log", "w") for r in (0, 1)]
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                                "--node-rank", str(r), "--master-addr", "127.0.0.1",
                                "--master-port", port, "--nproc-per-node", "1", *args,
                                "--out", str(tmp_path / "two")], cwd=ROOT, env=env,
                               stdout=logs[r], stderr=subprocess.STDOUT) for r in (0, 1)]
    try:
        for agent in agents:
            agent.wait(timeout=300)
    finally:
        for agent, log in zip(agents, logs):
            if agent.poll() is None:
                agent.kill()
            log.close()
    for r, agent in enumerate(agents):
        assert agent.returncode == 0, (tmp_path / f"agent{r}.log").read_text()[-2000:]
    a = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] > 0 and len(b["rng"]) == 2
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-5), k


def test_readme_notebook_snippet_runs(tiny_run, tiny_folder, tmp_path, monkeypatch):
    """The README's notebook example, run as written on a tiny checkpoint and folder."""
    text = (ROOT / "README.md").read_text()
    snippet = text.split("```python\n")[1].split("```")[0]
    snippet = snippet.replace("trained_models/synthetic-64/best_iou.pt", str(tiny_run / "best_iou.pt"))
    snippet = snippet.replace('"DIR"', repr(str(tiny_folder)))
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md", "exec"), {})
    assert (tmp_path / "masks.png").is_file()


@pytest.mark.slow
def test_resume_inside_an_epoch_after_time_stop(tmp_path, monkeypatch):
    """--max-minutes stops a run mid-epoch; the resume trains that epoch's remaining batches
    and repeats the uninterrupted run step for step (augmented folder data, no workers)."""
    import train_utils
    data = ROOT.parent / "shared" / "data" / "lung-ct-64"
    if not data.is_dir():
        pytest.skip("needs ../shared/data/lung-ct-64")
    flags = TINY + ["--data", str(data), "--batch-size", "32"]   # 192 train images: 6 batches
    full, _ = main.parse_args(flags + ["--epochs", "2", "--out", str(tmp_path / "full")])
    train(full)
    # the budget runs out at the 10th check: one before each step and one at each epoch's
    # end, so before step 9, the third batch of epoch 2
    checks = iter(range(10 ** 6))
    monkeypatch.setattr(train_utils, "deadline",
                        lambda minutes: lambda reserve=0.0: next(checks) >= 9)
    part, _ = main.parse_args(flags + ["--epochs", "2", "--max-minutes", "0.5",
                                       "--out", str(tmp_path / "part")])
    train(part)
    monkeypatch.undo()
    stopped = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    assert stopped["epoch"] == 1 and 0 < stopped["batch"] < 6, (stopped["epoch"], stopped["batch"])
    cfg, explicit = main.parse_args(flags + ["--epochs", "2", "--max-minutes", "0",
                                             "--resume", "auto", "--out", str(tmp_path / "part")])
    cfg, checkpoint = resume_config(cfg, explicit)
    train(cfg, resume_from=checkpoint)
    a, b = step_losses(full.out), step_losses(tmp_path / "part")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for s in a:
        assert a[s] == pytest.approx(b[s], abs=1e-6), s


class ToyNet(torch.nn.Module):
    """A user's own backbone: built from the two channel counts, forward(x_in, t)."""

    def __init__(self, in_channels, out_channels, width=8):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(in_channels, width, 3, padding=1)
        self.time = torch.nn.Embedding(1000, width)
        self.conv_out = torch.nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, x_in, t):
        h = torch.relu(self.conv_in(x_in) + self.time(t)[:, :, None, None])
        return self.conv_out(h)


def test_registered_toy_backbone_trains_saves_and_reloads(tmp_path, monkeypatch):
    """model.MODELS["toy"] = ToyNet, then --model toy: train() builds it, the checkpoint
    names it, load_checkpoint rebuilds it, and a process that has not registered it gets a
    clear error instead of a UNet with the wrong weights."""
    import model as model_module
    monkeypatch.setitem(model_module.MODELS, "toy", ToyNet)
    cfg = tiny_cfg(tmp_path / "run", epochs=1, model="toy")
    assert main.parse_args(["--model", "toy", "--image-size", "16"])[0].model == "toy"
    with pytest.raises(SystemExit):   # unet2d's shape flags do not apply to another backbone
        main.parse_args(["--model", "toy", "--base-channels", "32"])
    result = train(cfg)
    assert isinstance(result.ema_model, ToyNet) and result.progress.step == 32 // 8
    state = torch.load(Path(cfg.out) / "last.pt", weights_only=True)
    assert state["config"]["model"] == "toy"
    assert set(state["model"]) == set(ToyNet(2, 1).state_dict())
    model, diffusion, config = load_checkpoint(Path(cfg.out) / "last.pt")
    assert isinstance(model, ToyNet) and config.model == "toy"
    assert all(torch.equal(v, state["ema"][k]) for k, v in model.state_dict().items())
    assert diffusion.sample(model, torch.rand(2, 1, 16, 16), steps=2).shape == (2, 1, 16, 16)
    # a resume keeps the backbone; another one is refused, naming it
    resumed, _ = resume_config(*main.parse_args(["--out", cfg.out, "--resume", "auto"]))
    assert resumed.model == "toy"
    with pytest.raises(CheckpointError, match="--model unet2d"):
        resume_config(*main.parse_args(TINY + ["--out", cfg.out, "--resume", "auto",
                                               "--model", "unet2d"]))
    monkeypatch.delitem(model_module.MODELS, "toy")
    with pytest.raises(CheckpointError, match=r"MODELS\['toy'\] = MyNet"):
        load_checkpoint(Path(cfg.out) / "last.pt")


def test_checkpoint_from_before_backbones_loads_as_unet2d(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", epochs=1)
    train(cfg)
    state = torch.load(Path(cfg.out) / "last.pt", weights_only=True)
    for key in ("model", "mask_values", "mask_threshold", "mask_suffix", "allow_soft_masks",
                "fit", "test_fraction", "num_classes", "class_values", "representation",
                "flips", "term_weighting"):
        del state["config"][key]      # keys added with --model, the data flags, label maps
    torch.save(state, tmp_path / "old.pt")
    model, diffusion, config = load_checkpoint(tmp_path / "old.pt")
    assert config.model == "unet2d" and type(model).__name__ == "UNet2D"
    assert diffusion.num_classes == 2 and diffusion.mask_channels == 1
    new_model, _, _ = load_checkpoint(Path(cfg.out) / "last.pt")
    image = torch.rand(2, 1, 16, 16)
    old_probs = diffusion.sample(model, image, steps=2, generator=torch.Generator().manual_seed(0))
    new_probs = diffusion.sample(new_model, image, steps=2,
                                 generator=torch.Generator().manual_seed(0))
    assert old_probs.shape == (2, 1, 16, 16) and torch.equal(old_probs, new_probs)
