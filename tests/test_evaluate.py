"""Metrics on masks with known answers, ensembles and fusion, STAPLE, evaluate.py end to end."""
import csv
import json
import math
import time

import numpy as np
import pytest
import torch

import evaluate
from DDPM import MIRROR_VIEWS, Diffusion, mirror_members
from train_utils import ensemble_steps, fewest_good_steps
from utils import (auroc, fuse_samples, load_checkpoint, mask_metrics, staple,
                   uncertainty_maps)


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
    # every pixel has the same 3-of-5 votes, so no rater can be told more reliable than
    # another: STAPLE's posterior falls back to its prior, the mean vote
    assert torch.allclose(stapled, torch.full_like(stapled, 0.6), atol=1e-6)
    # on varied votes: STAPLE of each image's thresholded samples, pixels in place, and
    # confident where the samples are unanimous
    varied = torch.rand(2, 5, 4, 6, generator=torch.Generator().manual_seed(0))
    varied[0, :, :, :2], varied[0, :, :, 2] = 0.9, 0.1
    fused = fuse_samples(varied, "staple")
    for b in range(2):
        alone = staple((varied[b] > 0.5).reshape(5, -1)).reshape(4, 6)
        assert torch.allclose(fused[b, 0].double(), alone, atol=1e-6)
    assert (fused[0, 0, :, :2] > 0.99).all() and (fused[0, 0, :, 2] < 0.01).all()
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
    # 3 of the 4 (positive, negative) pairs ordered right; a tie counts half
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([0.3, 0.5, 0.5, 0.9], [0, 1, 0, 1]) == pytest.approx(3.5 / 4)
    # any shape is flattened; swapping the classes mirrors the area
    scores = np.random.default_rng(0).random((4, 5))
    labels = scores + np.random.default_rng(1).normal(0, 0.3, (4, 5)) > 0.5
    assert auroc(scores, labels) == pytest.approx(1 - auroc(scores, ~labels))
    assert auroc(scores, labels) == pytest.approx(auroc(scores.ravel(), labels.ravel()))


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
    assert torch.equal(probs, d.sample(model, images, steps=5, num_samples=4,
                                       generator=torch.Generator().manual_seed(0)))
    # from the same start noise, chunks of at most 5 of the 12 samples give the same masks
    noise = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    whole = d.sample(model, images, steps=5, num_samples=4, noise=noise)
    chunked = d.sample(model, images, steps=5, num_samples=4, max_batch=5, noise=noise)
    assert chunked.shape == (3, 4, 8, 8)
    assert torch.allclose(chunked, whole, atol=1e-6)
    # each image's K samples are adjacent in the noise: sample 2 of image 1 starts at 4*1+2
    alone = d.sample(model, images[1:2], steps=5, noise=noise[6:7])
    assert torch.allclose(alone[0, 0], whole[1, 2], atol=1e-6)
    single = d.sample(model, images, steps=5)
    assert single.shape == (3, 1, 8, 8)


class Thresholder(torch.nn.Module):
    """An x0-predicting 'model' whose mask is its image above 0.5, whatever the noise."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))   # gives the sampler a device

    def forward(self, x_in, t):
        return (x_in[:, 1:2] > 0.5).float() * 2 - 1 + self.dummy


class Pattern(torch.nn.Module):
    """An x0-predicting 'model' that ignores its input and draws one fixed, lopsided mask."""

    def __init__(self, size=8):
        super().__init__()
        self.mask = torch.nn.Parameter(torch.zeros(1, 1, size, size))
        with torch.no_grad():
            self.mask[..., :3, :2] = 1.0     # a block in the top-left corner only

    def forward(self, x_in, t):
        return (self.mask * 2 - 1).expand(x_in.shape[0], -1, -1, -1)


def test_mirror_members_flips_each_member_by_its_view_and_undoes_itself():
    x = torch.randn(3 * 5, 2, 4, 6)                     # 3 images x 5 members
    flipped = mirror_members(x, 5)
    assert torch.equal(mirror_members(flipped, 5), x)
    for s in range(5):
        axes = MIRROR_VIEWS[s % 4]
        want = x[s::5].flip(axes) if axes else x[s::5]
        assert torch.equal(flipped[s::5], want)
    assert torch.equal(flipped[0::5], x[0::5]) and torch.equal(flipped[4::5], x[4::5])
    assert torch.equal(mirror_members(x, 1), x)


def test_mirrored_ensemble_members_see_flipped_images_and_return_to_its_frame():
    d = Diffusion(50, prediction="x0")
    images = torch.rand(2, 1, 8, 8)                      # lopsided: no flip leaves them as is
    # a mask read off the image pixel by pixel is the same in every view once flipped back
    plain = d.sample(Thresholder(), images, steps=3, num_samples=5)
    mirrored = d.sample(Thresholder(), images, steps=3, num_samples=5, mirror=True)
    assert torch.equal(mirrored, plain)
    assert torch.equal(plain[:, 0], plain[:, 1])
    # a model blind to the image draws its fixed mask in the view it was given: member s
    # comes back as that mask flipped by its view
    drawn = d.sample(Pattern(), images, steps=3, num_samples=5, mirror=True)
    fixed = d.sample(Pattern(), images, steps=3, num_samples=1)[:, 0]
    assert fixed[:, :3, :2].min() > 0.9 and fixed[:, 3:].max() < 0.1
    for s in range(5):
        axes = MIRROR_VIEWS[s % 4]
        assert torch.equal(drawn[:, s], fixed.flip(axes) if axes else fixed)   # (B, H, W)
    # without mirroring every member draws it as it is
    assert torch.equal(d.sample(Pattern(), images, steps=3, num_samples=5),
                       fixed[:, None].expand(-1, 5, -1, -1))
    # chunks of at most 3 of the 10 members give the same masks as one pass
    torch.manual_seed(0)
    noisy, noise = Noisy(), torch.randn(10, 1, 8, 8)
    assert torch.allclose(d.sample(noisy, images, steps=3, num_samples=5, mirror=True,
                                   max_batch=3, noise=noise),
                          d.sample(noisy, images, steps=3, num_samples=5, mirror=True,
                                   noise=noise), atol=1e-6)


def test_evaluate_passes_mirroring_to_the_sampler(tmp_path):
    """Pattern's corner block is found exactly as it is; mirrored, three of five members put
    it in other corners, and the fused mean (2/5 there) predicts nothing."""
    d, model = Diffusion(50, prediction="x0"), Pattern()
    cases = [(torch.rand(1, 8, 8), model.mask[0].detach().clone()) for _ in range(2)]
    plain = evaluate.evaluate(model, d, cases, tmp_path / "plain", steps=2, ensemble=5)
    mirrored = evaluate.evaluate(model, d, cases, tmp_path / "mirror", steps=2, ensemble=5,
                                 mirror=True)
    assert plain["metrics"]["dice"]["mean"] == pytest.approx(1.0)
    assert mirrored["metrics"]["dice"]["mean"] == pytest.approx(0.0)
    assert mirrored["settings"]["mirror"] is True and plain["settings"]["mirror"] is False


def test_evaluate_scores_crafted_cases_with_known_answers(tmp_path):
    """Five 16 x 16 cases with known scores: missed, false alarm, both empty, exact, half."""
    def box(rows, cols):
        m = torch.zeros(1, 16, 16)
        m[:, rows, cols] = 1
        return m
    empty = torch.zeros(1, 16, 16)
    cases = [(empty, box(slice(2, 6), slice(2, 6))),            # truth 16 px, none predicted
             (box(slice(1, 4), slice(1, 4)), empty),            # 9 px predicted, no truth
             (empty, empty),
             (box(slice(5, 10), slice(5, 10)), box(slice(5, 10), slice(5, 10))),
             (box(slice(0, 10), slice(0, 10)), box(slice(0, 10), slice(5, 15)))]  # 50 of 100
    d = Diffusion(50, prediction="x0")
    metrics = evaluate.evaluate(Thresholder(), d, cases, tmp_path, steps=2, batch_size=2,
                                names=list("abcde"))
    with open(tmp_path / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["dice"]) for r in rows] == [0, 0, 1, 1, 0.5]
    assert [int(r["pred_pixels"]) for r in rows] == [0, 9, 0, 25, 100]
    assert [int(r["truth_pixels"]) for r in rows] == [16, 0, 0, 25, 100]
    dice = metrics["metrics"]["dice"]
    assert (dice["mean"], dice["n"]) == (0.5, 5)
    assert dice["std"] == pytest.approx(np.std([0, 0, 1, 1, 0.5]))
    assert metrics["metrics"]["iou"]["mean"] == pytest.approx((1 + 1 + 1 / 3) / 5)
    assert {k: v for k, v in metrics["empty_masks"].items() if k != "note"} == {
        "prediction_empty_truth_not": 1, "truth_empty_prediction_not": 1, "both_empty": 1}
    # distances exist only where both masks do: c and d at 0, e's two 5-px shifted squares
    assert metrics["metrics"]["hd95"]["n"] == metrics["metrics"]["assd"]["n"] == 3
    assert float(rows[2]["hd95"]) == float(rows[3]["hd95"]) == 0
    assert math.isnan(float(rows[0]["hd95"])) and math.isnan(float(rows[1]["assd"]))
    # 16 missed + 9 false + 50 + 50 of the half case, over 5 x 256 pixels
    assert metrics["uncertainty"]["wrong_pixel_fraction"] == pytest.approx(125 / 1280)
    # 0/1 probabilities: every threshold binarises alike
    assert metrics["medsegdiff_protocol"]["dice"] == pytest.approx(0.5)
    assert metrics["medsegdiff_protocol"]["iou"] == pytest.approx((1 + 1 + 1 / 3) / 5)


def test_evaluate_end_to_end_writes_every_file(tiny_run, tiny_folder, tmp_path):
    """metrics.json agrees with per_image.csv, the checkpoint and the clock."""
    out = tmp_path / "eval"
    start = time.perf_counter()
    metrics = evaluate.main(["--checkpoint", str(tiny_run / "best_iou.pt"), "--data",
                             str(tiny_folder), "--split", "test", "--steps", "3",
                             "--ensemble", "3", "--fusion", "staple", "--out", str(out),
                             "--batch-size", "4"])
    elapsed = time.perf_counter() - start
    text = (out / "metrics.json").read_text()
    assert text == json.dumps(metrics, indent=2)          # what it returns is what it wrote
    saved = json.loads(text)
    assert saved["images"] == 6
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [f"case{i}" for i in range(6)]
    # each summary is the mean and std of its per-image column, NaN distances left out
    for name in evaluate.METRICS:
        column = np.array([float(r[name]) for r in rows])
        finite = column[np.isfinite(column)]
        summary = saved["metrics"][name]
        assert summary["n"] == finite.size, name
        if finite.size:
            assert summary["mean"] == pytest.approx(finite.mean(), abs=1e-12), name
            assert summary["std"] == pytest.approx(finite.std(), abs=1e-12), name
    for r in rows:                                        # one binarisation for both scores
        dice = float(r["dice"])
        assert float(r["iou"]) == pytest.approx(dice / (2 - dice), abs=1e-12)
    # the empty-mask counts are those of the pixel columns, and exactly the images whose
    # distances are NaN
    pred = np.array([int(r["pred_pixels"]) for r in rows])
    truth = np.array([int(r["truth_pixels"]) for r in rows])
    empty = saved["empty_masks"]
    assert empty["prediction_empty_truth_not"] == int(((pred == 0) & (truth > 0)).sum())
    assert empty["truth_empty_prediction_not"] == int(((truth == 0) & (pred > 0)).sum())
    assert empty["both_empty"] == int(((pred == 0) & (truth == 0)).sum())
    one_empty = empty["prediction_empty_truth_not"] + empty["truth_empty_prediction_not"]
    assert saved["metrics"]["hd95"]["n"] == saved["metrics"]["assd"]["n"] == 6 - one_empty
    # pixel errors: |pred| + |truth| - 2|overlap| per image, the overlap from its Dice
    unc = saved["uncertainty"]
    wrong = ((pred + truth) * (1 - np.array([float(r["dice"]) for r in rows]))).sum()
    assert unc["wrong_pixel_fraction"] == pytest.approx(wrong / (6 * 16 * 16), abs=1e-9)
    # the mean entropy over all pixels splits into its wrong and right pixels
    mean_entropy = np.mean([float(r["uncertainty"]) for r in rows])
    fraction = unc["wrong_pixel_fraction"]
    split = fraction * unc["mean_on_wrong_pixels"] if fraction else 0.0
    assert split + (1 - fraction) * unc["mean_on_right_pixels"] == pytest.approx(
        mean_entropy, abs=1e-6)
    assert math.isnan(unc["auroc_for_pixel_error"]) == (fraction in (0, 1))
    protocol = saved["medsegdiff_protocol"]
    assert protocol["thresholds"] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert protocol["iou"] <= protocol["dice"]            # IoU <= Dice on every image
    state = torch.load(tiny_run / "best_iou.pt", weights_only=True)
    assert (saved["checkpoint"]["step"], saved["checkpoint"]["epoch"]) == (state["step"],
                                                                          state["epoch"])
    assert saved["checkpoint"]["config"] == state["config"]
    assert saved["settings"]["ensemble"] == 3 and saved["settings"]["fusion"] == "staple"
    # sampling time is part of the whole call's: no clock on a busy machine can break this
    assert 0 < saved["seconds_per_image"] * 6 <= elapsed
    assert list(out.glob("sheet_*.png")) and (out / "reliability.png").is_file()


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
    metrics = evaluate.main(["--checkpoint", str(tiny_run / "best_iou.pt"), "--steps", "2",
                             "--out", str(tmp_path / "own")])
    assert metrics["images"] == 8 and metrics["data"] == {"data": None, "split": "test"}
    model, diffusion, config = load_checkpoint(tiny_run / "best_iou.pt")
    test = build_datasets(None, image_size=16, seed=config.seed, synthetic_sizes=(32, 8, 8))["test"]
    direct = evaluate.evaluate(model, diffusion, test, tmp_path / "direct", steps=2, ensemble=5,
                               mirror=config.trained_mirrored())
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


def test_entropy_is_symmetric_and_zero_where_samples_agree():
    """Pixels whose samples all say foreground are as certain as those that all say
    background: neither may rank above the other as a predictor of error."""
    probs = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.2, 0.2], [0.8, 0.8], [0.0, 1.0]])
    entropy = uncertainty_maps(probs.T[None, :, :, None])["entropy"].flatten().tolist()
    assert entropy[0] == entropy[1] == 0
    assert entropy[2] == pytest.approx(entropy[3], abs=1e-6)
    assert entropy[4] == pytest.approx(1.0)
    assert entropy[2] == pytest.approx(-(0.2 * math.log2(0.2) + 0.8 * math.log2(0.8)), abs=1e-6)


def test_expected_calibration_error_on_crafted_probabilities():
    from utils import calibration_bins, expected_calibration_error
    rng = np.random.default_rng(0)
    # calibrated: probability 0.3 where 30% of pixels are foreground, 0.9 where 90% are
    probs = np.r_[np.full(1000, 0.3), np.full(1000, 0.9)]
    labels = np.r_[np.arange(1000) < 300, np.arange(1000) < 900]
    assert expected_calibration_error(*calibration_bins(probs, labels)) == pytest.approx(0)
    # over-confident: 0.9 where only 60% are foreground, on half the pixels -> 0.5 * 0.3
    labels = np.r_[np.arange(1000) < 300, np.arange(1000) < 600]
    assert expected_calibration_error(*calibration_bins(probs, labels)) == pytest.approx(0.15)
    # a hard mask that is right on 95% of pixels: ECE is its error rate
    truth = rng.random(2000) < 0.4
    hard = np.where(rng.random(2000) < 0.95, truth, ~truth).astype(float)
    assert expected_calibration_error(*calibration_bins(hard, truth)) == pytest.approx(
        (hard != truth).mean())
    # bins add up over batches, and 1.0 lands in the last bin
    counts, psum, ysum = calibration_bins(np.array([0.0, 1.0, 0.5]), np.array([0, 1, 1]), 4)
    assert counts.tolist() == [1, 0, 1, 1] and psum.tolist() == [0, 0, 0.5, 1]


def test_no_sampler_flags_use_the_runs_choice(tiny_run, tmp_path):
    """Without --steps and --ensemble: a K=5 ensemble with the DDIM step count the run chose
    on its val split at the end of training for an ensemble (stored in the checkpoint);
    --ensemble 1 with the count chosen for one sample."""
    state = torch.load(tiny_run / "best_iou.pt", weights_only=True)
    dice = dict(map(tuple, state["sample_steps_dice"]))
    assert state["sample_steps"] == fewest_good_steps(dice)
    assert state["ensemble_steps"] == ensemble_steps(dice, load_checkpoint(
        tiny_run / "best_iou.pt")[1])
    metrics = evaluate.main(["--checkpoint", str(tiny_run / "best_iou.pt"),
                             "--out", str(tmp_path / "e")])
    assert metrics["settings"]["steps"] == state["ensemble_steps"]
    assert metrics["settings"]["ensemble"] == 5
    torch.save({**state, "sample_steps": 1, "ensemble_steps": 2}, tmp_path / "two.pt")
    assert evaluate.main(["--checkpoint", str(tmp_path / "two.pt"), "--steps", "1",
                          "--out", str(tmp_path / "given")])["settings"]["steps"] == 1
    assert evaluate.main(["--checkpoint", str(tmp_path / "two.pt"),
                          "--out", str(tmp_path / "k5")])["settings"]["steps"] == 2
    assert evaluate.main(["--checkpoint", str(tmp_path / "two.pt"), "--ensemble", "1",
                          "--out", str(tmp_path / "k1")])["settings"]["steps"] == 1
    assert metrics["settings"]["mirror"] is False   # the synthetic set trains unflipped
    assert evaluate.main(["--checkpoint", str(tmp_path / "two.pt"), "--mirror", "on",
                          "--out", str(tmp_path / "on")])["settings"]["mirror"] is True
    assert evaluate.main(["--checkpoint", str(tmp_path / "two.pt"), "--mirror", "off",
                          "--out", str(tmp_path / "off")])["settings"]["mirror"] is False
    del state["sample_steps"], state["ensemble_steps"]  # a checkpoint from before the choice
    torch.save(state, tmp_path / "old.pt")
    assert evaluate.main(["--checkpoint", str(tmp_path / "old.pt"), "--ensemble", "1",
                          "--out", str(tmp_path / "o")])["settings"]["steps"] == 25
