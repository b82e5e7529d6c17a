"""Metrics on masks with known answers, ensembles and fusion, STAPLE, evaluate.py end to end."""
import csv
import json
import math

import numpy as np
import pytest
import torch

import evaluate
from DDPM import Diffusion
from utils import auroc, fuse_samples, mask_metrics, staple, uncertainty_maps


def blank(h=32, w=32):
    return np.zeros((h, w), dtype=bool)


def test_identical_masks_score_perfectly():
    a = blank()
    a[5:20, 8:25] = True
    m = mask_metrics(a, a)
    assert m["dice"] == m["iou"] == m["precision"] == m["recall"] == m["boundary_f1"] == 1
    assert m["hd95"] == 0 and m["assd"] == 0


def test_two_lines_a_known_distance_apart():
    # two vertical 1-pixel lines 7 columns apart: every boundary distance is exactly 7
    pred, truth = blank(), blank()
    pred[4:20, 3] = True
    truth[4:20, 10] = True
    m = mask_metrics(pred, truth)
    assert m["dice"] == 0 and m["iou"] == 0
    assert m["hd95"] == pytest.approx(7) and m["assd"] == pytest.approx(7)
    assert m["boundary_f1"] == 0
    m = mask_metrics(pred, truth, spacing=0.5)
    assert m["hd95"] == pytest.approx(3.5)
    assert mask_metrics(pred, truth, tolerance=7)["boundary_f1"] == 1


def test_two_squares_a_known_distance_apart():
    # 5x5 squares, the second 10 px to the right. Every boundary pixel's nearest partner is
    # on its own row at the other square's near edge: distances 10 (far edge, 5 pixels),
    # 6 (near edge, 5) and 7, 8, 9 (top and bottom rows, 2 each), the same both ways.
    pred, truth = blank(), blank()
    pred[10:15, 2:7] = True
    truth[10:15, 12:17] = True
    m = mask_metrics(pred, truth)
    assert m["dice"] == 0
    assert m["assd"] == pytest.approx((5 * 10 + 5 * 6 + 2 * (7 + 8 + 9)) / 16)   # 8.0
    assert m["hd95"] == pytest.approx(10)


def test_partial_overlap_dice_and_iou():
    pred, truth = blank(), blank()
    pred[0:10, 0:10] = True       # 100 pixels
    truth[0:10, 5:15] = True      # 100 pixels, 50 shared
    m = mask_metrics(pred, truth)
    assert m["dice"] == pytest.approx(0.5) and m["iou"] == pytest.approx(50 / 150)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.5)


def test_empty_cases():
    both = mask_metrics(blank(), blank())
    assert both["dice"] == 1 and both["iou"] == 1 and both["hd95"] == 0 and both["assd"] == 0
    truth = blank()
    truth[3:6, 3:6] = True
    one = mask_metrics(blank(), truth)
    assert one["dice"] == 0 and one["iou"] == 0
    assert math.isnan(one["hd95"]) and math.isnan(one["assd"])
    other = mask_metrics(truth, blank())
    assert other["dice"] == 0 and math.isnan(other["hd95"])


def test_staple_on_identical_raters_returns_the_rater():
    rater = (torch.rand(1000, generator=torch.Generator().manual_seed(0)) > 0.7)
    weights = staple(torch.stack([rater] * 4))
    assert torch.equal(weights > 0.5, rater)
    assert (weights[rater] > 0.99).all() and (weights[~rater] < 0.01).all()


def test_staple_outvotes_an_unreliable_rater():
    g = torch.Generator().manual_seed(1)
    truth = torch.rand(4000, generator=g) > 0.5
    good = [truth ^ (torch.rand(4000, generator=g) < 0.05) for _ in range(3)]
    noisy = torch.rand(4000, generator=g) > 0.5
    weights = staple(torch.stack([*good, noisy]))
    accuracy = ((weights > 0.5) == truth).float().mean()
    assert accuracy > 0.98


def test_fusion_modes():
    probs = torch.tensor([0.9, 0.8, 0.2, 0.6, 0.1]).reshape(1, 5, 1, 1).expand(2, 5, 3, 3)
    mean = fuse_samples(probs, "mean")
    vote = fuse_samples(probs, "vote")
    stapled = fuse_samples(probs, "staple")
    for fused in (mean, vote, stapled):
        assert fused.shape == (2, 1, 3, 3)
    assert torch.allclose(mean, torch.full_like(mean, 0.52))
    assert torch.allclose(vote, torch.full_like(vote, 0.6))     # 3 of 5 above 0.5
    assert ((stapled >= 0) & (stapled <= 1)).all()
    with pytest.raises(ValueError):
        fuse_samples(probs, "median")
    maps = uncertainty_maps(probs)
    assert maps["variance"].shape == maps["entropy"].shape == (2, 1, 3, 3)
    agree = uncertainty_maps(torch.ones(1, 5, 2, 2))
    assert agree["variance"].max() == 0 and agree["entropy"].max() < 1e-3


def test_auroc():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auroc([0.5, 0.5], [0, 1]) == 0.5
    assert math.isnan(auroc([0.1, 0.2], [0, 0]))


class Noisy(torch.nn.Module):
    """A model whose prediction depends on the noise it is given, so samples differ."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x_in, t):
        return self.conv(x_in)


def test_ensemble_shapes_and_batching():
    d = Diffusion(50, prediction="x0")
    torch.manual_seed(0)
    model = Noisy()
    images = torch.rand(3, 1, 8, 8)
    probs = d.sample(model, images, steps=5, num_samples=4, generator=torch.Generator().manual_seed(0))
    assert probs.shape == (3, 4, 8, 8)
    assert not torch.equal(probs[:, 0], probs[:, 1])     # different noise per sample
    chunked = d.sample(model, images, steps=5, num_samples=4, max_batch=5,
                       generator=torch.Generator().manual_seed(0))
    assert chunked.shape == (3, 4, 8, 8)
    single = d.sample(model, images, steps=5)
    assert single.shape == (3, 1, 8, 8)


def test_evaluate_end_to_end_writes_every_file(tiny_run, tiny_folder, tmp_path):
    out = tmp_path / "eval"
    metrics = evaluate.main(["--checkpoint", str(tiny_run / "best_iou.pt"), "--data",
                             str(tiny_folder), "--split", "test", "--steps", "3",
                             "--ensemble", "3", "--fusion", "staple", "--out", str(out),
                             "--batch-size", "4"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["images"] == 6 and metrics["images"] == 6
    for name in ("dice", "iou", "precision", "recall", "hd95", "assd", "boundary_f1"):
        assert name in saved["metrics"]
    assert {"dice", "iou", "thresholds"} <= set(saved["medsegdiff_protocol"])
    assert saved["checkpoint"]["step"] > 0 and saved["checkpoint"]["config"]["image_size"] == 16
    assert saved["settings"]["ensemble"] == 3 and saved["seconds_per_image"] > 0
    assert "auroc_for_pixel_error" in saved["uncertainty"]
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [f"case{i}" for i in range(6)]
    assert list(out.glob("sheet_*.png"))


def test_predict_folder_of_unlabelled_images(tiny_run, tiny_folder, tmp_path):
    from PIL import Image
    images = tmp_path / "images"
    images.mkdir()
    Image.new("L", (24, 16), 128).save(images / "wide.png")      # non-square: padded, cut back
    Image.open(tiny_folder / "test" / "images" / "case0.png").save(images / "case0.jpg")
    evaluate.main(["--checkpoint", str(tiny_run / "last.pt"), "--images", str(images),
                   "--steps", "2", "--out", str(tmp_path / "pred")])
    wide = Image.open(tmp_path / "pred" / "masks" / "wide.png")
    assert wide.size == (24, 16)
    assert set(np.unique(np.asarray(wide))) <= {0, 255}
    assert (tmp_path / "pred" / "uncertainty" / "case0.png").is_file()


def test_corrupt_or_mismatched_checkpoint_gives_clear_error(tiny_run, tiny_folder, tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    args = ["--data", str(tiny_folder), "--out", str(tmp_path / "e"), "--steps", "2"]
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--checkpoint", str(garbage), *args])
    assert exit_info.value.code == 2
    assert "cannot load checkpoint" in capsys.readouterr().err
    state = torch.load(tiny_run / "last.pt", weights_only=True)
    state["config"]["base_channels"] = 12
    torch.save(state, tmp_path / "mismatch.pt")
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(tmp_path / "mismatch.pt"), *args])
    assert "do not fit" in capsys.readouterr().err


def test_evaluate_defaults_to_the_runs_own_test_split(tiny_run, tmp_path):
    """Without --data the checkpoint's own data is scored: for the synthetic default, the
    seeded test split its run set aside (8 images in the tiny run), as if passed by hand."""
    from dataset import build_datasets
    from utils import load_checkpoint
    metrics = evaluate.main(["--checkpoint", str(tiny_run / "best_iou.pt"), "--steps", "2",
                             "--out", str(tmp_path / "own")])
    assert metrics["images"] == 8 and metrics["data"] == {"data": None, "split": "test"}
    model, diffusion, config = load_checkpoint(tiny_run / "best_iou.pt")
    test = build_datasets(None, image_size=16, seed=config.seed, synthetic_sizes=(32, 8, 8))["test"]
    direct = evaluate.evaluate(model, diffusion, test, tmp_path / "direct", steps=2)
    assert metrics["metrics"]["dice"]["mean"] == direct["metrics"]["dice"]["mean"]


def test_flat_folder_scores_the_held_back_test_images(tmp_path):
    """A run on a flat images/ + masks/ folder holds back a seeded test fraction;
    `evaluate.py --split test` scores exactly those images, read with the run's own
    --mask-values (the masks are label maps that only those values make binary)."""
    import main
    from conftest import TINY_FLAGS
    from dataset import load_split, split_indices
    from PIL import Image
    from train_utils import train
    folder = tmp_path / "flat"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        labels = np.zeros((16, 16), np.uint8)
        labels[rng.integers(0, 8):, :8] = 150                   # another class: background
        labels[4:12, rng.integers(6, 10):] = 250                # the foreground
        Image.fromarray(labels).save(folder / "masks" / f"p{i:02d}.png")
        Image.fromarray(np.where(labels == 250, 200, 60).astype(np.uint8)).save(
            folder / "images" / f"p{i:02d}.png")
    cfg, _ = main.parse_args(TINY_FLAGS + ["--data", str(folder), "--mask-values", "250",
                                           "--test-fraction", "0.2", "--epochs", "1",
                                           "--batch-size", "4", "--out", str(tmp_path / "run")])
    train(cfg)
    out = tmp_path / "eval"
    metrics = evaluate.main(["--checkpoint", str(tmp_path / "run" / "last.pt"), "--split",
                             "test", "--steps", "2", "--out", str(out)])
    with open(out / "per_image.csv") as f:
        scored = [r["name"] for r in csv.DictReader(f)]
    test, val, rest = split_indices(20, [0.2, 0.1], cfg.seed)
    names = [f"p{i:02d}" for i in range(20)]
    assert scored == [names[i] for i in test] and metrics["images"] == 4
    assert not set(scored) & {names[i] for i in rest + val}
    assert load_split(str(folder), "val", image_size=16, test_fraction=0.2,
                      mask_values=[250]).names == \
        [names[i] for i in val]
    # a named split that a flat folder does not have is still refused, naming the fix
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(tmp_path / "run" / "last.pt"), "--split", "valid",
                       "--out", str(tmp_path / "e2")])
