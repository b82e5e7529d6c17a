import sys
from pathlib import Path

import pytest

# the repo is a folder of scripts, not a package: make its top-level modules importable
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY_FLAGS = ["--image-size", "16", "--synthetic-train", "32", "--synthetic-val", "8",
              "--synthetic-test", "8", "--base-channels", "8", "--channel-mults", "1", "2",
              "--num-res-blocks", "1", "--attention-resolutions", "2", "--timesteps", "50",
              "--batch-size", "8", "--eval-steps", "2", "--val-every", "4", "--log-every", "1",
              "--warmup-steps", "2", "--num-workers", "0"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run folder with a tiny model trained one epoch on the synthetic set."""
    import main
    from train_utils import train
    cfg, _ = main.parse_args(TINY_FLAGS + ["--epochs", "1",
                                           "--out", str(tmp_path_factory.mktemp("tiny") / "run")])
    train(cfg)
    return Path(cfg.out)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A `test` split of 6 synthetic 16x16 PNG pairs, as a user's folder would hold them."""
    from PIL import Image
    from dataset import SyntheticContours
    root = tmp_path_factory.mktemp("folder")
    for sub in ("images", "masks"):
        (root / "test" / sub).mkdir(parents=True)
    for i, (image, mask) in enumerate(SyntheticContours(6, 16, seed=9)):
        Image.fromarray((image[0].numpy() * 255).round().astype("uint8")).save(
            root / "test" / "images" / f"case{i}.png")
        Image.fromarray((mask[0].numpy() * 255).astype("uint8")).save(
            root / "test" / "masks" / f"case{i}.png")
    return root


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped on the CPU "
                                       "(benchmarks/gpu_check.sh runs them)")
    config.addinivalue_line("markers", "slow: multi-process or end-to-end (seconds each); "
                                       "`python -m pytest -q -m 'not slow'` skips them, CI runs all")
