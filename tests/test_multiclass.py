"""Label maps of K > 2 classes: reading, the diffusion-space codings, per-class metrics,
fusion, uncertainty and calibration, and a short training run end to end."""
import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import main
from dataset import ContourDataset, DatasetError, train_augmentation
from DDPM import (Diffusion, bit_codes, class_probabilities, encode_labels,
                  labels_from_probabilities, mask_channels)
from utils import (TrainConfig, class_overlap, fuse_samples, mask_metrics, uncertainty_maps)


def blobs(size=24, seed=0):
    """A label map with classes 1, 2, 3 as three disjoint rectangles, jittered by seed."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), np.uint8)
    for k, (r, c) in enumerate([(2, 2), (2, 13), (13, 7)], start=1):
        dr, dc = rng.integers(0, 3, 2)
        labels[r + dr:r + dr + 8, c + dc:c + dc + 8] = k
    return labels


def write_label_set(root, n=6, values=(0, 1, 2, 3), size=24, split="train"):
    """`n` image / label-map pairs; class k stored as values[k]; the image shows the classes
    as grey levels, so the task is learnable."""
    for sub in ("images", "masks"):
        (root / split / sub).mkdir(parents=True, exist_ok=True)
    lut = np.asarray(values, np.uint8)
    for i in range(n):
        labels = blobs(size, seed=i)
        image = (labels * 60 + 20).astype(np.uint8)
        Image.fromarray(image).save(root / split / "images" / f"case{i}.png")
        Image.fromarray(lut[labels]).save(root / split / "masks" / f"case{i}.png")
    return root


# ----------------------------------------------------------------------------- reading

def test_label_maps_read_as_class_indices(tmp_path):
    write_label_set(tmp_path / "plain")
    data = ContourDataset(tmp_path / "plain", "train", image_size=24, num_classes=4)
    image, contour = data[0]
    assert contour.shape == (1, 24, 24)
    assert torch.equal(contour[0].long(), torch.from_numpy(blobs(24, 0)).long())

    write_label_set(tmp_path / "valued", values=(0, 150, 200, 250))
    data = ContourDataset(tmp_path / "valued", "train", image_size=24, num_classes=4,
                          class_values=[0, 150, 200, 250])
    assert torch.equal(data[3][1][0].long(), torch.from_numpy(blobs(24, 3)).long())
    # another order of --class-values is another class numbering
    data = ContourDataset(tmp_path / "valued", "train", image_size=24, num_classes=4,
                          class_values=[0, 250, 200, 150])
    assert torch.equal(data[3][1][0].long(), torch.from_numpy((4 - blobs(24, 3)) % 4).long())


def test_absent_classes_are_fine(tmp_path):
    write_label_set(tmp_path, values=(0, 1, 2, 3))
    data = ContourDataset(tmp_path, "train", image_size=24, num_classes=6)   # 4, 5 never seen
    assert data[0][1].max() == 3


def test_unmapped_values_are_refused_naming_file_and_flag(tmp_path):
    write_label_set(tmp_path / "a", values=(0, 150, 200, 250))
    with pytest.raises(DatasetError, match=r"case0\.png.*150.*--class-values 0 150 200 250"):
        ContourDataset(tmp_path / "a", "train", image_size=24, num_classes=4)
    with pytest.raises(DatasetError, match=r"case0\.png.*250.*--class-values"):
        ContourDataset(tmp_path / "a", "train", image_size=24, num_classes=4,
                       class_values=[0, 150, 200, 255])
    write_label_set(tmp_path / "b", values=(0, 1, 2, 3))
    with pytest.raises(DatasetError, match=r"case0\.png.*3.*outside.*0\.\.2"):
        ContourDataset(tmp_path / "b", "train", image_size=24, num_classes=3)


def test_config_refuses_mixed_flags():
    with pytest.raises(ValueError, match="--class-values"):
        TrainConfig(data="x", num_classes=4, mask_values=(1,))
    with pytest.raises(ValueError, match="4 distinct"):
        TrainConfig(data="x", num_classes=4, class_values=(0, 1, 2))
    with pytest.raises(ValueError, match="synthetic"):
        TrainConfig(num_classes=3)


def test_binary_label_map_error_names_num_classes(tmp_path):
    write_label_set(tmp_path, values=(0, 150, 200, 250))
    with pytest.raises(DatasetError, match="--num-classes 4 --class-values 0 150 200 250"):
        ContourDataset(tmp_path, "train", image_size=24)


def test_augmentation_keeps_labels(tmp_path):
    write_label_set(tmp_path, n=2)
    torch.manual_seed(0)
    data = ContourDataset(tmp_path, "train", image_size=40, num_classes=4, augment=True)
    for _ in range(10):
        _, contour = data[0]
        assert set(contour.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}


def test_flips_by_rule():
    from train_utils import dataset_options
    flips = lambda **kw: dataset_options(TrainConfig(data="x", **kw))["flips"]  # noqa: E731
    assert flips() is True                         # binary masks: flipped as before
    assert flips(num_classes=4) is False           # label maps: left stays left
    assert flips(num_classes=4, flips="on") is True
    assert flips(flips="off") is False
    names = lambda t: [type(x).__name__ for x in t.transforms]  # noqa: E731
    assert "RandomHorizontalFlip" in names(train_augmentation())
    assert "RandomHorizontalFlip" not in names(train_augmentation(flips=False))
    # evaluate.py's --mirror auto: the ensemble is mirrored where training flipped images
    mirrored = lambda **kw: TrainConfig(**{"data": "x", **kw}).trained_mirrored()  # noqa: E731
    assert mirrored() is True
    assert mirrored(num_classes=4) is False and mirrored(num_classes=4, flips="on") is True
    assert mirrored(flips="off") is False and mirrored(augment=False) is False
    assert mirrored(data=None) is False            # the synthetic set is never augmented


def test_fractional_label_values_refused(tmp_path):
    from dataset import label_map
    with pytest.raises(DatasetError, match=r"m\.tif.*fractional"):
        label_map(np.array([[0.0, 0.5], [1.0, 2.0]], np.float32), "m.tif", 3)
    assert label_map(np.array([[0.0, 1.0], [2.0, 2.0]], np.float32), "m.tif", 3).max() == 2


# ----------------------------------------------------------------------------- codings

@pytest.mark.parametrize("representation", ["onehot", "bits"])
@pytest.mark.parametrize("k", range(2, 11))
def test_encode_decode_round_trip(k, representation):
    labels = torch.randint(0, k, (3, 1, 9, 11))
    labels[0, 0, 0, :k] = torch.arange(k)                 # every class present
    x0 = encode_labels(labels, k, representation)
    assert x0.shape[1] == mask_channels(k, representation)
    assert set(x0.unique().tolist()) <= {-1.0, 1.0}
    probs = class_probabilities(x0, k, representation)
    if k == 2:
        assert torch.equal(x0, labels.float() * 2 - 1)     # today's single channel
        assert torch.equal(labels_from_probabilities(probs, 2), labels)
    else:
        assert probs.shape == (3, k, 9, 11)
        assert torch.allclose(probs.sum(1), torch.ones(3, 9, 11))
        assert torch.equal(labels_from_probabilities(probs, k), labels[:, 0])


def test_channel_counts_and_codes():
    assert [mask_channels(k, "onehot") for k in (2, 3, 4, 9)] == [1, 3, 4, 9]
    assert [mask_channels(k, "bits") for k in (2, 3, 4, 5, 8, 9)] == [1, 2, 2, 3, 3, 4]
    assert bit_codes(5).tolist() == [[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]]


def test_bits_probabilities_of_noisy_estimates():
    # two bits, K=3: an estimate halfway on bit 0 and sure off on bit 1 splits classes 0 and 1
    x0 = torch.tensor([0.0, -1.0]).reshape(1, 2, 1, 1)
    p = class_probabilities(x0, 3, "bits")[0, :, 0, 0]
    assert p.tolist() == pytest.approx([0.5, 0.5, 0.0], abs=1e-3)
    # the unused code 3 (both bits on) hands its mass to the valid codes
    x0 = torch.tensor([1.0, 1.0]).reshape(1, 2, 1, 1)
    p = class_probabilities(x0, 3, "bits")[0, :, 0, 0]
    assert p.sum() == pytest.approx(1) and p.argmax() in (1, 2)


@pytest.mark.parametrize("representation", ["onehot", "bits"])
def test_loss_probabilities_have_bounded_gradients(representation):
    """Where every class's estimate is near 0 (or an unused bit code), normalising would
    divide by almost nothing; the loss uses the unnormalised probabilities."""
    x0 = torch.tensor([-0.999998, -0.999998, -1.5]).reshape(1, 3, 1, 1)
    if representation == "bits":
        x0 = torch.tensor([0.9999, 0.9999]).reshape(1, 2, 1, 1)     # code 3 of K=3: unused
    x0.requires_grad_(True)
    d = Diffusion(10, num_classes=3, representation=representation)
    d.probabilities(x0, normalise=False).sum().backward()
    assert x0.grad.abs().max() <= 1.0


def test_binary_representation_is_one_channel_whatever_the_flag():
    assert TrainConfig(representation="bits").representation == "onehot"
    assert mask_channels(2, "bits") == 1


def test_sample_shapes():
    net = lambda x, t: x[:, :3] * 0   # noqa: E731 - predicts x0 = 0 everywhere
    net.parameters = lambda: iter([torch.zeros(1)])
    net.training, net.eval, net.train = False, lambda: None, lambda mode=True: None
    d = Diffusion(10, prediction="x0", num_classes=3)
    probs = d.sample(net, torch.zeros(2, 1, 8, 8), steps=2, num_samples=4)
    assert probs.shape == (2, 4, 3, 8, 8)
    assert torch.allclose(probs, torch.full_like(probs, 1 / 3))   # x0 = 0: uniform
    one = d.sample(net, torch.zeros(2, 1, 8, 8), steps=2)
    assert one.shape == (2, 1, 3, 8, 8)


# ----------------------------------------------------------------------------- metrics

def test_per_class_metrics_known_answers():
    truth = np.zeros((20, 20), int)
    truth[2:6, 2:6] = 1           # 16 px
    truth[10:14, 10:14] = 2       # 16 px
    pred = truth.copy()
    pred[2:6, 2:4] = 0            # class 1: 8 of 16 found -> dice 2*8/24
    pred[10:14, 10:14] = 3        # class 2 missing, class 3 appears where truth has none
    row = evaluate.image_metrics(pred, truth, 4)
    assert row["dice_1"] == pytest.approx(16 / 24) and row["iou_1"] == pytest.approx(0.5)
    assert row["dice_2"] == 0 and row["dice_3"] == 0
    assert row["dice"] == pytest.approx((16 / 24 + 0 + 0) / 3)
    assert math.isnan(row["hd95_2"]) and row["hd95"] == row["hd95_1"]
    # a class absent from both scores 1, as the training loop's overlap does
    same = evaluate.image_metrics(truth, truth, 4)
    assert same["dice"] == 1 and same["dice_3"] == 1
    dice, iou = class_overlap(torch.from_numpy(pred)[None], torch.from_numpy(truth)[None], 4)
    assert dice.item() == pytest.approx(row["dice"]) and iou.item() == pytest.approx(1 / 6)


def _medpy_hd95(pred, truth):
    """MedPy's hd95: the 95th percentile of both directed surface distances pooled."""
    from scipy import ndimage
    def surface(m):
        return m & ~ndimage.binary_erosion(m, ndimage.generate_binary_structure(2, 1))
    dt_t = ndimage.distance_transform_edt(~surface(truth))
    dt_p = ndimage.distance_transform_edt(~surface(pred))
    return np.percentile(np.concatenate([dt_t[surface(pred)], dt_p[surface(truth)]]), 95)


def test_hd95_conventions_against_oracles():
    monai_metrics = pytest.importorskip("monai.metrics")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    pooled, larger = [], []
    for _ in range(30):
        masks = []
        for _ in range(2):
            cy, cx, r = rng.uniform(18, 46), rng.uniform(18, 46), rng.uniform(6, 14)
            blob = (yy - cy) ** 2 + ((xx - cx) * rng.uniform(0.7, 1.3)) ** 2 < r ** 2
            masks.append(blob)
        pred, truth = masks
        m = mask_metrics(pred, truth)
        assert m["hd95"] == pytest.approx(_medpy_hd95(pred, truth), abs=1e-6)
        oracle = monai_metrics.compute_hausdorff_distance(
            torch.from_numpy(pred)[None, None], torch.from_numpy(truth)[None, None],
            percentile=95).item()
        assert m["hd95_max"] == pytest.approx(oracle, abs=1e-4)
        pooled.append(m["hd95"])
        larger.append(m["hd95_max"])
    assert np.mean(larger) > np.mean(pooled)   # the two conventions differ, as the issue saw


# ----------------------------------------------------------------------------- ensembles

def test_fusion_of_class_distributions():
    # 3 samples of one pixel over 3 classes
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.5, 0.4], [0.1, 0.5, 0.4]])
    probs = probs.reshape(1, 3, 3, 1, 1)
    mean = fuse_samples(probs, "mean")[0, :, 0, 0]
    assert mean.tolist() == pytest.approx([0.8 / 3, 1.3 / 3, 0.9 / 3])
    vote = fuse_samples(probs, "vote")[0, :, 0, 0]
    assert vote.tolist() == pytest.approx([1 / 3, 2 / 3, 0])
    with pytest.raises(ValueError, match="staple"):
        fuse_samples(probs, "staple")


def test_entropy_normalised_by_log_k():
    k = 4
    uniform = torch.full((1, 2, k, 1, 1), 1 / k)
    sure = torch.nn.functional.one_hot(torch.tensor(2), k).float().reshape(1, 1, k, 1, 1)
    sure = sure.expand(1, 2, k, 1, 1)
    assert uncertainty_maps(uniform)["entropy"].item() == pytest.approx(1)
    assert uncertainty_maps(sure)["entropy"].item() == 0
    half = torch.tensor([0.5, 0.5, 0, 0]).reshape(1, 1, k, 1, 1)
    assert uncertainty_maps(half)["entropy"].item() == pytest.approx(math.log(2) / math.log(4))


def test_classwise_ece():
    """Two classes each predicted 0.75: one right every time, one half the time. Each is
    off by 0.25, so the class-wise ECE is 0.25, though pooled they look calibrated."""
    from utils import calibration_bins
    n = 100
    bins = [calibration_bins(np.full(n, 0.75), np.arange(n) < hits) for hits in (100, 50)]
    summary = evaluate.calibration_summary(bins)
    assert summary["ece"] == pytest.approx(0.25)
    pooled = [sum(parts) for parts in zip(*bins)]
    assert evaluate.calibration_summary([pooled])["ece"] == pytest.approx(0.0)


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_multiclass_trains_evaluates_and_predicts(tmp_path):
    from train_utils import train
    from utils import load_checkpoint
    root = write_label_set(tmp_path / "data", n=12, values=(0, 85, 170, 255), size=16)
    write_label_set(root, n=4, values=(0, 85, 170, 255), size=16, split="test")
    flags = ["--data", str(root), "--num-classes", "4", "--class-values", "0", "85", "170",
             "255", "--image-size", "16", "--base-channels", "8", "--channel-mults", "1", "2",
             "--attention-resolutions", "2", "--timesteps", "50", "--batch-size", "4",
             "--epochs", "2", "--val-every", "2", "--num-workers", "0", "--warmup-steps", "2",
             "--loss-dice", "1", "--loss-boundary", "0.5", "--out", str(tmp_path / "run")]
    cfg, _ = main.parse_args(flags)
    train(cfg)
    model, diffusion, config = load_checkpoint(tmp_path / "run" / "last.pt")
    assert diffusion.num_classes == 4 and config.class_values == (0, 85, 170, 255)
    assert model(torch.zeros(1, 1 + 4, 16, 16), torch.zeros(1, dtype=torch.long)).shape[1] == 4

    out = tmp_path / "eval"
    evaluate.main(["--checkpoint", str(tmp_path / "run" / "last.pt"), "--out", str(out),
                   "--ensemble", "2", "--steps", "2"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics["per_class"]) == ["1", "2", "3"]
    assert set(metrics["per_class"]["3"]) == set(metrics["metrics"])
    mean_dice = np.mean([metrics["per_class"][k]["dice"]["mean"] for k in "123"])
    assert metrics["metrics"]["dice"]["mean"] == pytest.approx(mean_dice)
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and "hd95_max_2" in rows[0]
    assert metrics["uncertainty"]["measure"].endswith("/ log 4")
    assert metrics["calibration"]["note"].count("4 classes") == 1   # class-wise ECE

    images = tmp_path / "unlabelled"
    images.mkdir()
    Image.fromarray(np.full((16, 20), 80, np.uint8)).save(images / "wide.png")
    evaluate.main(["--checkpoint", str(tmp_path / "run" / "last.pt"), "--images", str(images),
                   "--out", str(tmp_path / "pred"), "--steps", "2", "--ensemble", "2"])
    written = np.asarray(Image.open(tmp_path / "pred" / "masks" / "wide.png"))
    assert written.shape == (16, 20) and written.max() <= 3
