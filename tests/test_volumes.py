"""nnU-Net's raw layout (dataset.json, imagesTr/, labelsTr/, imagesTs/, labelsTs/) with PNG
files and with NIfTI volumes: reading, refusals, the slice/volume round trip, the split by
case, the empty-slice rule, intensity windows, and a short training run."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import main
from dataset import (DatasetError, NnUNetDataset, build_datasets, intensity_to_unit,
                     load_split, stack_slices, volume_slices)
from utils import TrainConfig, data_defaults

nibabel = pytest.importorskip("nibabel")
SPACING = (0.8, 0.7, 2.5)


def write_json(root, ending, labels=("background", "lesion"), channels=("CT",), **extra):
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {str(i): c for i, c in enumerate(channels)},
        "labels": {name: i for i, name in enumerate(labels)},
        "numTraining": 0, "file_ending": ending, **extra}))


def lesion_volume(seed, shape=(16, 16, 6)):
    """A CT-like volume in HU (air -1000, tissue 40) with a lesion (label 1) on some slices."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    r, c = rng.integers(3, 9, 2)
    labels[r:r + 5, c:c + 5, 1:4] = 1                   # slices 0, 4, 5 stay empty
    image = np.where(labels > 0, 40.0, -1000.0) + rng.normal(0, 5, shape)
    return image.astype(np.float32), labels


def make_nifti_set(root, cases=6, test_cases=2, channels=1, shape=(16, 16, 6)):
    root.mkdir(parents=True, exist_ok=True)
    write_json(root, ".nii.gz", channels=("CT", "PET")[:channels])
    affine = np.diag([*SPACING, 1.0])
    for split, n, offset in (("Tr", cases, 0), ("Ts", test_cases, 100)):
        (root / f"images{split}").mkdir(parents=True)
        (root / f"labels{split}").mkdir(parents=True)
        for i in range(n):
            image, labels = lesion_volume(offset + i, shape)
            for ch in range(channels):
                nibabel.save(nibabel.Nifti1Image(image + 10 * ch, affine),
                             root / f"images{split}" / f"case{offset + i:03d}_{ch:04d}.nii.gz")
            nibabel.save(nibabel.Nifti1Image(labels, affine),
                         root / f"labels{split}" / f"case{offset + i:03d}.nii.gz")
    return root


def make_png_set(root, cases=5):
    root.mkdir(parents=True, exist_ok=True)
    write_json(root, ".png", labels=("background", "lung", "heart"))
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir(parents=True)
    for i in range(cases):
        labels = np.zeros((20, 20), np.uint8)
        labels[2:9, 2 + i:9 + i] = 1
        labels[12:18, 5:12] = 2
        Image.fromarray((labels * 100).astype(np.uint8)).save(root / "imagesTr" / f"x{i}_0000.png")
        Image.fromarray(labels).save(root / "labelsTr" / f"x{i}.png")
    return root


def test_png_layout_reads_classes_and_channels(tmp_path):
    root = make_png_set(tmp_path)
    data = NnUNetDataset(root, "train", image_size=20)
    assert data.num_classes == 3 and data.channels == 1 and len(data) == 5
    image, contour = data[0]
    assert image.shape == (1, 20, 20) and set(contour.unique().tolist()) == {0.0, 1.0, 2.0}
    cfg, _ = main.parse_args(["--data", str(root)])
    assert cfg.num_classes == 3 and cfg.channels == 1


def test_nifti_layout_slices_spacing_and_channels(tmp_path):
    root = make_nifti_set(tmp_path, channels=2)
    data = NnUNetDataset(root, "train", image_size=16)
    assert len(data) == 6 * 6 and data.channels == 2 and data.num_classes == 2
    assert data.spacing["case000"] == pytest.approx(SPACING)
    assert data.names[:2] == ["case000_0000", "case000_0001"]
    image, contour = data[2]
    assert image.shape == (2, 16, 16) and contour.shape == (1, 16, 16) and contour.max() == 1
    axial = NnUNetDataset(root, "train", image_size=16, slice_axis=0)
    assert len(axial) == 6 * 16
    cfg, _ = main.parse_args(["--data", str(root)])
    assert (cfg.num_classes, cfg.channels) == (2, 2)
    with pytest.raises(ValueError, match="dataset.json lists 2"):
        data_defaults(TrainConfig(data=str(root), num_classes=4), {"num_classes"})
    stored = TrainConfig.from_dict(cfg.to_dict() | {"channels": 3})   # a checkpoint's config
    assert stored.channels == 3                                        # is not re-read


def test_slice_volume_round_trip_is_bit_equal():
    volume = np.random.default_rng(0).normal(size=(5, 7, 3)).astype(np.float32)
    for axis in (0, 1, 2, -1):
        assert np.array_equal(stack_slices(volume_slices(volume, axis), axis, 3), volume)
    flat = np.arange(12.0).reshape(3, 4)
    assert np.array_equal(stack_slices(volume_slices(flat, -1), -1, 2), flat)


def test_refusals_name_the_file(tmp_path):
    root = make_nifti_set(tmp_path / "a", cases=2, test_cases=1, channels=2)
    (root / "imagesTr" / "case001_0001.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"case001_0001\.nii\.gz is missing.*channel_names"):
        NnUNetDataset(root, "train")

    root = make_nifti_set(tmp_path / "b", cases=2, test_cases=1)
    nibabel.save(nibabel.Nifti1Image(np.zeros((16, 16, 6), np.float32), np.eye(4)),
                 root / "imagesTr" / "case000_0001.nii.gz")
    with pytest.raises(DatasetError, match=r"case000_0001\.nii\.gz.*lists 1 channel"):
        NnUNetDataset(root, "train")

    root = make_nifti_set(tmp_path / "c", cases=2, test_cases=1)
    (root / "labelsTr" / "case000.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"labelsTr/case000\.nii\.gz is missing"):
        NnUNetDataset(root, "train")

    root = make_nifti_set(tmp_path / "d", cases=2, test_cases=1)
    labels = np.zeros((16, 16, 6), np.uint8)
    labels[0, 0, 0] = 3
    nibabel.save(nibabel.Nifti1Image(labels, np.eye(4)), root / "labelsTr" / "case001.nii.gz")
    with pytest.raises(DatasetError, match=r"case001\.nii\.gz stores value\(s\) 3.*labels"):
        NnUNetDataset(root, "train")


def test_dataset_json_promises_are_checked(tmp_path):
    root = make_nifti_set(tmp_path / "a", cases=2, test_cases=1)
    write_json(root, ".nii.gz", numTraining=3)
    with pytest.raises(DatasetError, match=r"dataset\.json says numTraining 3.*2 case"):
        NnUNetDataset(root, "train")
    write_json(root, ".nii.gz", numTraining=2)
    assert len(NnUNetDataset(root, "train", image_size=16)) == 12
    write_json(root, ".nii.gz", dataset={"case000": {"images": ["imagesTr/case000_0000.nii.gz"],
                                                     "label": "labelsTr/case009.nii.gz"}})
    with pytest.raises(DatasetError, match=r"names labelsTr/case009\.nii\.gz.*not there"):
        NnUNetDataset(root, "train")
    root = make_nifti_set(tmp_path / "b", cases=2, test_cases=1)
    (root / "imagesTr" / "case001_0000.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"labelsTr/case001\.nii\.gz has no image"):
        NnUNetDataset(root, "train")


def test_nibabel_missing_is_one_clear_line(tmp_path, monkeypatch):
    root = make_nifti_set(tmp_path, cases=1, test_cases=0)
    monkeypatch.setitem(__import__("sys").modules, "nibabel", None)
    with pytest.raises(DatasetError, match="needs nibabel"):
        NnUNetDataset(root, "train")


def test_val_is_held_back_by_case_and_empty_slices_are_capped(tmp_path):
    root = make_nifti_set(tmp_path, cases=10)
    data = build_datasets(str(root), image_size=16, val_fraction=0.2, seed=0,
                          empty_slice_fraction=0.2)
    train_cases = {case for case, _ in data["train"].slices}
    val_cases = {case for case, _ in data["val"].slices}
    assert len(val_cases) == 2 and not train_cases & val_cases
    assert len(data["val"]) == 2 * 6                        # val keeps every slice
    empty = sum(not m.any() for m in data["train"].labels)
    assert empty <= 0.2 * len(data["train"]) and empty > 0  # 24 lesion slices, 6 empty
    assert data["test"] is None                             # read when scored:
    assert len(load_split(str(root), "test", image_size=16)) == 2 * 6
    val = load_split(str(root), "val", image_size=16, val_fraction=0.2, seed=0)
    assert val.names == data["val"].names


def test_window_applies_to_ct_channels_only(tmp_path):
    from dataset import windowed_channels
    assert windowed_channels(["CT", "PET"], (-1000, 400)) == [True, False]
    assert windowed_channels(["T1", "T2"], (0, 800)) == [True, True]      # no CT: all
    assert windowed_channels(["CT"], None) == [False]
    root = make_nifti_set(tmp_path, cases=1, test_cases=0, channels=2)
    data = NnUNetDataset(root, "train", image_size=16, window=(-1000, 400))
    ct, pet = data.images[2].float()                     # a lesion slice
    assert ct.min() == 0 and ct.max() > 0.7              # windowed: air 0, tissue ~0.74
    assert pet.max() == 1 and pet.min() == 0             # percentiles of its own volume


def test_window_and_percentile_intensities():
    hu = np.array([-2000.0, -1000.0, -300.0, 400.0, 3000.0])
    assert intensity_to_unit(hu, (-1000, 400)).tolist() == pytest.approx([0, 0, 0.5, 1, 1])
    scaled = intensity_to_unit(np.linspace(0, 100, 1001))
    assert scaled.min() == 0 and scaled.max() == 1 and scaled[500] == pytest.approx(0.5)
    assert intensity_to_unit(np.array([0, 255]), full_scale=255).tolist() == [0, 1]


@pytest.mark.slow
def test_nifti_set_trains(tmp_path):
    from train_utils import train
    root = make_nifti_set(tmp_path / "data", cases=6)
    cfg, _ = main.parse_args(["--data", str(root), "--image-size", "16", "--base-channels", "8",
                              "--channel-mults", "1", "2", "--attention-resolutions", "2",
                              "--timesteps", "50", "--batch-size", "4", "--epochs", "2",
                              "--val-every", "4", "--num-workers", "0", "--window", "-1000",
                              "400", "--out", str(tmp_path / "run")])
    result = train(cfg)
    assert result.progress.step > 0 and cfg.window == (-1000, 400)


def test_3d_metrics_with_anisotropic_spacing():
    from utils import mask_metrics
    truth = np.zeros((10, 10, 8), bool)
    truth[2:7, 2:7, 2:5] = True
    pred = np.zeros_like(truth)
    pred[2:7, 2:7, 3:6] = True                       # one slice off along z
    m = mask_metrics(pred, truth, spacing=(0.5, 0.5, 2.5))
    assert m["dice"] == pytest.approx(2 * 50 / 150)
    assert m["hd95"] == pytest.approx(2.5) and m["hd95_max"] == pytest.approx(2.5)
    # the same shift in-plane costs 0.5 mm
    pred = np.zeros_like(truth)
    pred[3:8, 2:7, 2:5] = True
    assert mask_metrics(pred, truth, spacing=(0.5, 0.5, 2.5))["hd95"] == pytest.approx(0.5)


@pytest.mark.slow
def test_per_volume_evaluation_in_mm(tmp_path):
    import evaluate
    from train_utils import train
    root = make_nifti_set(tmp_path / "data", cases=6, test_cases=2)
    cfg, _ = main.parse_args(["--data", str(root), "--image-size", "16", "--base-channels", "8",
                              "--channel-mults", "1", "2", "--attention-resolutions", "2",
                              "--timesteps", "50", "--batch-size", "4", "--epochs", "1",
                              "--val-every", "4", "--num-workers", "0",
                              "--out", str(tmp_path / "run")])
    train(cfg)
    out = tmp_path / "eval"
    metrics = evaluate.main(["--checkpoint", str(tmp_path / "run" / "last.pt"), "--split",
                             "test", "--out", str(out), "--ensemble", "1", "--steps", "1"])
    assert metrics["images"] == 2 and "per volume" in metrics["rows"]
    rows = (out / "per_image.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["case100", "case101"]


def test_volume_rows_stack_slices_back_and_measure_in_mm(tmp_path):
    from evaluate import volume_rows
    root = make_nifti_set(tmp_path, cases=1, test_cases=1)
    data = NnUNetDataset(root, "test", image_size=32)   # resized up, then mapped back
    truth, spacing = data.case_truth("case100")
    exact = {key: data.labels[i].long() for i, key in enumerate(data.slices)}
    rows = [{"uncertainty": 0.0}] * len(data)
    row = volume_rows(data, exact, rows, 2)[0]
    assert row["name"] == "case100" and row["dice"] == 1 and row["hd95"] == 0
    shifted = {(case, k): exact[(case, max(k - 1, 0))] for case, k in data.slices}
    row = volume_rows(data, shifted, rows, 2)[0]     # the lesion one slice later along z
    assert row["hd95"] == pytest.approx(SPACING[2]) and row["dice"] < 1


@pytest.mark.slow
def test_predicted_volumes_keep_shape_affine_and_ending(tmp_path):
    import evaluate
    from train_utils import train
    root = make_nifti_set(tmp_path / "data", cases=4, test_cases=2, shape=(12, 20, 5))
    cfg, _ = main.parse_args(["--data", str(root), "--image-size", "16", "--base-channels", "8",
                              "--channel-mults", "1", "2", "--attention-resolutions", "2",
                              "--timesteps", "50", "--batch-size", "4", "--epochs", "1",
                              "--num-workers", "0", "--out", str(tmp_path / "run")])
    train(cfg)
    out = tmp_path / "pred"
    evaluate.main(["--checkpoint", str(tmp_path / "run" / "last.pt"), "--images",
                   str(root / "imagesTs"), "--out", str(out), "--steps", "1", "--ensemble", "2"])
    for case in ("case100", "case101"):
        source = nibabel.load(root / "imagesTs" / f"{case}_0000.nii.gz")
        written = nibabel.load(out / "masks" / f"{case}.nii.gz")
        assert written.shape == source.shape == (12, 20, 5)
        assert np.allclose(written.affine, source.affine)
        assert written.header.get_zooms() == pytest.approx(SPACING)
        assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1}
        assert nibabel.load(out / "uncertainty" / f"{case}.nii.gz").shape == (12, 20, 5)
