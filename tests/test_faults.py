"""Faults: SIGKILL and resume, crashes during saves, corrupt and hostile checkpoints,
non-finite losses, a failing rank, an unusable run folder. Each test is bounded in time."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import main
import train_utils
from conftest import TINY_FLAGS
from train_utils import NonFiniteLossError, RunFolderError, train
from utils import (CheckpointError, find_resume_checkpoint, load_checkpoint, resume_config,
                   save_checkpoint)

ROOT = Path(__file__).resolve().parents[1]
# 20 steps an epoch at 32 px: long enough to be killed in the middle of one
KILLABLE = TINY_FLAGS + ["--image-size", "32", "--synthetic-train", "160", "--epochs", "3",
                         "--val-every", "20"]


def cfg_for(out, flags=TINY_FLAGS, **overrides):
    cfg, _ = main.parse_args(flags + ["--out", str(out)])
    for k, v in {"epochs": 2, **overrides}.items():
        setattr(cfg, k, v)
    return cfg


def logged_steps(run):
    path = Path(run) / "metrics.csv"
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        return max((int(r["step"]) for r in csv.DictReader(f)), default=0)


def logged_losses(run):
    with open(Path(run) / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["loss"]}


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    command = [sys.executable, "main.py", *KILLABLE]
    # the time limits below only stop a hung run: each run takes seconds on an idle machine
    full = tmp_path / "full"
    subprocess.run([*command, "--out", str(full)], cwd=ROOT, check=True, timeout=600,
                   capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*command, "--out", str(killed)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while (logged_steps(killed) < 25 and proc.poll() is None   # inside epoch 2 of 3
           and time.monotonic() < deadline):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert 20 < logged_steps(killed) < 60, "the kill should land inside epoch 2"
    resumed = subprocess.run([*command, "--out", str(killed), "--resume", "auto"], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "at epoch 1" in resumed.stdout
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(killed / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 60 and a["epoch"] == b["epoch"] == 3
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k


@pytest.mark.slow
def test_killed_worker_restarts_from_last_checkpoint(tmp_path):
    """torchrun --max-restarts 1 with --resume auto from the start: a worker killed
    mid-run makes the job restart from last.pt (the log says so), losing at most the steps
    since that checkpoint, and the job ends with exit code 0 where an uninterrupted run
    ends."""
    out, log_path = tmp_path / "run", tmp_path / "agent.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "--max-restarts", "1", "main.py", *KILLABLE,
               "--num-workers", "0", "--resume", "auto"]
    with open(log_path, "w") as log:
        agent = subprocess.Popen([*command, "--out", str(out)], cwd=ROOT, env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while (logged_steps(out) < 25 and agent.poll() is None
                   and time.monotonic() < deadline):   # past the checkpoint at step 20
                time.sleep(0.05)
            workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True,
                                     text=True).stdout.split()
            assert workers, "no worker to kill: " + log_path.read_text()[-3000:]
            saved = torch.load(out / "last.pt", weights_only=True)["step"]
            os.kill(int(workers[-1]), signal.SIGKILL)
            agent.wait(timeout=180)   # seconds on an idle machine
        finally:
            if agent.poll() is None:
                agent.kill()
    text = log_path.read_text()
    assert agent.returncode == 0, text[-3000:]
    assert f"torchrun restart 1: resuming from {out / 'last.pt'}" in text
    resumed = int(text.split(f"resumed from {out / 'last.pt'}")[1].split("(step ")[1].split(")")[0])
    assert resumed == saved >= 20                 # lost: only the steps since last.pt
    final = torch.load(out / "last.pt", weights_only=True)
    assert final["step"] == 60 and final["epoch"] == 3


def test_save_keeps_previous_and_resume_falls_back(tmp_path):
    cfg = cfg_for(tmp_path / "run", epochs=2)
    train(cfg)
    run = Path(cfg.out)
    assert (run / "last_prev.pt").is_file()        # epoch 1's, kept when epoch 2 replaced it
    prev_epoch = torch.load(run / "last_prev.pt", weights_only=True)["epoch"]
    assert prev_epoch == 1
    uninterrupted = logged_losses(run)
    # a crash while writing last.pt leaves a truncated file under the real name
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 3])
    cfg.resume = "auto"
    assert find_resume_checkpoint(cfg) == run / "last_prev.pt"
    assert (run / "last.pt.corrupt").is_file() and not (run / "last.pt").exists()
    # resuming from it continues at epoch 1 and ends at the same epoch count
    resumed, checkpoint = resume_config(cfg, {"resume"})
    result = train(resumed, resume_from=checkpoint)
    assert result.progress.epoch == 2
    # and repeats epoch 2 as the first run trained it
    again = logged_losses(run)
    assert sorted(again) == sorted(uninterrupted) == list(range(1, 9))
    for step, loss in uninterrupted.items():
        assert again[step] == pytest.approx(loss, abs=1e-6), step
    # with no good file left: one clear error naming the file
    (run / "last.pt").write_bytes(b"garbage")
    (run / "last_prev.pt").write_bytes(b"garbage too")
    with pytest.raises(CheckpointError, match="last.pt"):
        find_resume_checkpoint(cfg)


def test_save_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"v": torch.ones(2)}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint({"v": torch.zeros(2)}, path, keep_previous=True)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(2))


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    real = train_utils.loss_fn
    calls = {"n": 0}

    def flaky(output, target, **kw):
        calls["n"] += 1
        loss, parts = real(output, target, **kw)
        return (loss * float("nan"), parts) if calls["n"] in (3, 4) else (loss, parts)
    monkeypatch.setattr(train_utils, "loss_fn", flaky)
    cfg = cfg_for(tmp_path / "run", epochs=1)
    result = train(cfg)
    assert result.progress.skipped_steps == 2
    state = torch.load(Path(cfg.out) / "last.pt", weights_only=True)
    assert state["step"] == 32 // 8 - 2    # 4 batches, 2 skipped
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_fp16_gradscaler_skips_nonfinite_step(tmp_path, monkeypatch):
    real = train_utils.loss_fn
    calls = {"n": 0}

    def flaky(output, target, **kw):
        calls["n"] += 1
        loss, parts = real(output, target, **kw)
        return (loss * float("inf"), parts) if calls["n"] == 2 else (loss, parts)
    monkeypatch.setattr(train_utils, "loss_fn", flaky)
    cfg = cfg_for(tmp_path / "run", epochs=1, amp="fp16")
    result = train(cfg)
    skipped = result.progress.skipped_steps
    assert skipped >= 1          # the injected inf; fp16 may overflow on its own at 2^16
    state = torch.load(Path(cfg.out) / "last.pt", weights_only=True)
    assert state["step"] == result.progress.step == 32 // 8 - skipped
    # the scaler halved its scale once per skipped step, and grew in none (interval 2000)
    assert state["scaler"]["scale"] == 2.0 ** 16 * state["scaler"]["backoff_factor"] ** skipped
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_persistent_nonfinite_loss_stops_with_clear_message(tmp_path, monkeypatch):
    real = train_utils.loss_fn
    monkeypatch.setattr(train_utils, "loss_fn", lambda output, target, **kw: (
        real(output, target, **kw)[0] * float("nan"), {"mse": torch.tensor(0.0)}))
    cfg = cfg_for(tmp_path / "run", epochs=3, max_nonfinite_steps=3)
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        train(cfg)
    assert not (Path(cfg.out) / "last.pt").exists()


def test_checkpoint_with_nan_weights_is_never_written(tmp_path, monkeypatch):
    from utils import check_finite
    with pytest.raises(FloatingPointError, match="non-finite"):
        check_finite({"w": torch.tensor([1.0, float("nan")])}, "the model")
    # and through training: NaN weights after an optimiser step stop the save
    real_step = torch.optim.AdamW.step

    def poisoning_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    cfg = cfg_for(tmp_path / "run", epochs=1)
    with pytest.raises(FloatingPointError):
        train(cfg)
    assert not (Path(cfg.out) / "last.pt").exists()


class Hostile:
    """Unpickling this runs a shell command, unless the loader refuses it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_hostile_checkpoint_is_refused_by_every_loader(tiny_run, tiny_folder, tmp_path):
    marker = tmp_path / "pwned"
    state = torch.load(tiny_run / "last.pt", weights_only=True)
    state["payload"] = Hostile(marker)
    hostile = tmp_path / "hostile.pt"
    torch.save(state, hostile)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(hostile)
    for command in (["main.py", *TINY_FLAGS, "--resume", str(hostile), "--out", str(tmp_path / "r")],
                    ["evaluate.py", "--checkpoint", str(hostile), "--data", str(tiny_folder),
                     "--out", str(tmp_path / "e")]):
        proc = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and "refused" in proc.stderr, proc.stderr[-1000:]
        assert "Traceback" not in proc.stderr
    assert not marker.exists()


def _rank_that_fails(local_rank, world_size, cfg, port):
    import main as launcher
    import train_utils as tu
    if local_rank == 1:
        real = tu.loss_fn
        calls = {"n": 0}

        def failing(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("injected failure on rank 1")
            return real(*args, **kwargs)
        tu.loss_fn = failing
    launcher.worker(local_rank, world_size, cfg, set(), port)


@pytest.mark.slow
def test_failing_rank_ends_the_job_quickly(tmp_path, capfd):
    """What `python main.py --nproc 2` does when rank 1 raises mid-epoch while rank 0 waits
    in an all-reduce: the job fails in seconds instead of hanging, the root error is shown,
    and no worker outlives it."""
    cfg = cfg_for(tmp_path / "run", epochs=50)
    # A hang would last gloo's 30-minute timeout (or the 50 epochs); the job itself takes
    # seconds. The bound only tells the two apart, with room for a machine busy with other
    # jobs, where starting two Python processes with torch alone can take many seconds.
    no_hang_s = 180
    start = time.monotonic()
    context = mp.start_processes(_rank_that_fails, args=(2, cfg, main.free_port()), nprocs=2,
                                 join=False, start_method="spawn")
    try:
        with pytest.raises(mp.ProcessRaisedException):
            while not context.join(timeout=1):
                assert time.monotonic() - start < no_hang_s, "the job hung after a rank failed"
        err = capfd.readouterr().err
        assert "[rank 1] failed" in err and "injected failure on rank 1" in err
        for p in context.processes:           # join() has already ended the other rank
            p.join(timeout=10)
        assert not any(p.is_alive() for p in context.processes)
    finally:
        for p in context.processes:           # a failed assertion leaves no worker behind
            if p.is_alive():
                p.kill()


@pytest.mark.slow
def test_unwritable_run_folder_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = cfg_for(blocker / "run")
    with pytest.raises(RunFolderError, match="not writable"):
        train(cfg)
    proc = subprocess.run([sys.executable, "main.py", *TINY_FLAGS, "--out", str(blocker / "run")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not writable" in proc.stderr


def test_full_disk_fails_before_training(tmp_path, monkeypatch):
    import shutil
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: real(p)._replace(free=1024))
    cfg = cfg_for(tmp_path / "run")
    with pytest.raises(RunFolderError, match="MiB free"):
        train(cfg)
    assert not (Path(cfg.out) / "metrics.csv").exists()
