"""CUDA paths: fp16 with GradScaler, bf16, channels_last, torch.compile. Skipped on the CPU."""
from pathlib import Path

import pytest
import torch

import main
from conftest import TINY_FLAGS
from train_utils import train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_amp_training_on_cuda(tmp_path, amp):
    cfg, _ = main.parse_args(TINY_FLAGS + ["--epochs", "2", "--amp", amp,
                                           "--out", str(tmp_path / amp)])
    result = train(cfg)
    state = torch.load(Path(cfg.out) / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    if amp == "fp16":
        assert state["scaler"]["scale"] > 0 and "_growth_tracker" in state["scaler"]
    assert next(result.ema_model.parameters()).is_cuda


def test_compiled_channels_last_sampling(tiny_run):
    from evaluate import predict, prepare_model
    from utils import load_checkpoint
    model, diffusion, _ = load_checkpoint(tiny_run / "last.pt")
    model = prepare_model(model, torch.device("cuda"), compile=True)
    fused, samples, _ = predict(model, diffusion, torch.rand(4, 1, 16, 16), steps=3,
                                ensemble=2, amp=torch.bfloat16)
    assert fused.shape == (4, 1, 16, 16) and samples.shape == (4, 2, 16, 16)
    assert torch.isfinite(fused).all()
