"""The benchmarks' own bookkeeping (their figures are measured by running them)."""
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_FLAGS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_shift  # noqa: E402
import main  # noqa: E402
from train_utils import train  # noqa: E402


def test_a_finished_run_is_recognised_with_its_cadence_by_rule(tmp_path):
    """bench_variants leaves --val-every to the rule, which train() resolves and stores; a
    rerun must still see the run as done (before the fix it trained every run again), and
    a run of other flags or fewer steps as not done."""
    i = TINY_FLAGS.index("--val-every")
    flags = TINY_FLAGS[:i] + TINY_FLAGS[i + 2:] + ["--max-steps", "4", "--out",
                                                   str(tmp_path / "run")]
    cfg, _ = main.parse_args(flags)
    assert cfg.val_every == 0
    train(cfg)
    run = Path(cfg.out)
    assert bench_shift.finished(run, flags, 4)
    assert not bench_shift.finished(run, flags, 8)                       # not that far
    assert not bench_shift.finished(run, flags + ["--val-every", "2"], 4)  # another cadence
    assert not bench_shift.finished(run, flags + ["--lr", "0.01"], 4)


def test_paired_difference_on_known_per_image_scores():
    """bench_quality's image-by-image comparison: the mean of a - b, who wins how often,
    the image a loses most on, and a bootstrap interval that holds the mean and collapses
    to it when every image differs by the same amount; an image without a score (NaN) on
    either side is left out."""
    import bench_quality
    a, b = [0.9, 0.7, 0.95, 0.8], [0.8, 0.9, 0.85, 0.8]           # a - b: .1, -.2, .1, 0
    p = bench_quality.paired_difference(a, b, ["w", "x", "y", "z"], resamples=2000)
    assert abs(p["mean"] - 0.0) < 1e-12
    assert (p["a_better"], p["b_better"]) == (2, 1)
    assert p["largest_loss"]["name"] == "x"
    assert abs(p["largest_loss"]["difference"] + 0.2) < 1e-12
    low, high = p["ci95"]
    assert -0.2 <= low < 0 < high <= 0.1  # means of resamples: within [min, max]
    # two images: a resample's mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4, so the
    # 2.5th and 97.5th percentiles over images are exactly 0 and 1
    assert bench_quality.paired_difference([1, 0], [0, 0], ["a", "b"])["ci95"] == [0.0, 1.0]
    same = bench_quality.paired_difference([0.9] * 5, [0.85] * 5, list("abcde"))
    assert abs(same["ci95"][0] - 0.05) < 1e-9 and abs(same["ci95"][1] - 0.05) < 1e-9
    assert (same["a_better"], same["b_better"], same["images"]) == (5, 0, 5)
    gaps = bench_quality.paired_difference([0.9, float("nan"), 0.7], [0.8, 0.5, 0.9], list("abc"))
    assert abs(gaps["mean"] - (-0.05)) < 1e-12 and gaps["largest_loss"]["name"] == "c"
    assert gaps["images"] == 2
    with pytest.raises(ValueError):                               # scores of different images
        bench_quality.paired_difference([0.9, 0.8], [0.9], ["a", "b"])
    with pytest.raises(ValueError):                               # one name short
        bench_quality.paired_difference([0.9, 0.8], [0.9, 0.7], ["a"])


def test_mirrored_baseline_averages_the_four_views_in_the_images_frame():
    """The U-Net reference row: probabilities averaged over the views, each flipped back."""
    import bench_quality
    image = torch.randn(2, 1, 6, 6)
    pointwise = lambda x: x * 3              # noqa: E731  a view-blind, pixel-wise 'U-Net'
    assert torch.equal(bench_quality.mirrored_labels(pointwise, image, 2),
                       bench_quality.labels(pointwise(image), 2))
    corner = torch.full((1, 1, 6, 6), -5.0)
    corner[..., 0, 0] = 5.0                  # always says: the top-left pixel, nothing else
    fixed = lambda x: corner.expand(x.shape[0], -1, -1, -1)   # noqa: E731
    # each view puts its pixel in another corner: one vote in four for each, so none is kept
    assert bench_quality.mirrored_labels(fixed, image, 2).sum() == 0
    classes = lambda x: torch.cat([x, -x, x.abs() - 1], 1)   # noqa: E731  pixel-wise, 3 classes
    got = bench_quality.mirrored_labels(classes, image, 3)
    assert got.shape == (2, 1, 6, 6)
    assert torch.equal(got, bench_quality.labels(classes(image), 3))


def test_seed_summary_groups_seeds_and_gives_a_t_interval(tmp_path, capsys):
    """seed_summary: per-seed differences grouped by data set and size, their mean, sample
    sd and 95% t-interval (t(0.975, 2) = 4.3027 from the table), a rescore's results.json
    read through its run, and the later of two files for one seed kept."""
    import json

    import seed_summary
    s = seed_summary.summarise([0.001, 0.002, 0.003])
    half = 4.302652729911275 * 0.001 / 3 ** 0.5
    assert abs(s["mean"] - 0.002) < 1e-12 and abs(s["sd"] - 0.001) < 1e-12
    assert abs(s["ci95"][0] - (0.002 - half)) < 1e-9 and abs(s["ci95"][1] - (0.002 + half)) < 1e-9

    def run(name, seed, ddpm, unet, data="set-a"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({
            "data": f"/x/{data}", "image_size": 64, "seed": seed,
            "results": {"DDPM-v2 K=5": {"dice": ddpm}, "U-Net (BCE + Dice)": {"dice": unet}},
            "baseline_training": {"steps": 10}}))
        return folder / "results.json"

    paths = [run("a0", 0, 0.90, 0.91), run("a1", 1, 0.95, 0.92), run("b0", 0, 0.5, 0.6, "set-b")]
    rescore = tmp_path / "a0" / "rescore-abc"
    rescore.mkdir()
    (rescore / "results.json").write_text(json.dumps({
        "run": str(tmp_path / "a0"),
        "results": {"DDPM-v2 K=5": {"dice": 0.93}, "U-Net (BCE + Dice)": {"dice": 0.91}}}))
    groups = seed_summary.main([*map(str, paths), str(rescore / "results.json")])
    assert set(groups) == {("set-a", 64), ("set-b", 64)}
    a = groups[("set-a", 64)]
    assert a[0]["ddpm"] == 0.93 and a[0]["unet_steps"] == 10   # the rescore won, via its run
    out = capsys.readouterr().out
    assert "seeds 0 and 1 (issue 16's target): mean difference +0.02500" in out
    assert "| mean of 1 | 0.50000 | 0.60000 | -0.10000 | |" in out


def test_seed_summary_against_compares_variant_and_defaults_seed_by_seed(tmp_path, capsys):
    """--against: test and val Dice differences over the seeds both sets have; the val
    figure is the one-sample val Dice at the steps the run chose (the fewest within 0.001
    of the best, so 2 steps' 0.9705 is passed over for 1 step's 0.9700)."""
    import seed_summary

    def run(name, seed, ddpm, val, curve=None):
        folder = tmp_path / name
        (folder / "ddpm").mkdir(parents=True)
        if curve:    # metrics.csv: a validation every 100 steps, loss rows between
            rows = [f"{s},0.1,{c}" for s, c in curve] + ["150,0.1,"]
            (folder / "ddpm" / "metrics.csv").write_text("step,loss,val_iou\n" + "\n".join(rows))
        (folder / "results.json").write_text(json.dumps({
            "data": "/x/set-a", "image_size": 128, "seed": seed, "val_dice_by_steps": val,
            "results": {"DDPM-v2 K=5": {"dice": ddpm}, "U-Net (BCE + Dice)": {"dice": 0.9}},
            "baseline_training": {"steps": 10}}))
        return str(folder / "results.json")

    variant = [run("v0", 0, 0.95, {"1": 0.9700, "2": 0.9705}, [(100, 0.90), (200, 0.95)]),
               run("v1", 1, 0.93, {"1": 0.96}, [(100, 0.92), (200, 0.93), (300, 0.94)])]
    base = [run("d0", 0, 0.94, {"1": 0.9600}, [(100, 0.91), (200, 0.93)]),
            run("d1", 1, 0.94, {"1": 0.95}, [(100, 0.90), (300, 0.93)]),
            run("d2", 2, 0.5, {"1": 0.5})]
    seed_summary.main([*variant, "--against", *base])
    out = capsys.readouterr().out
    assert "| 0 | 0.9500 | 0.9400 | +0.0100 | 0.9700 | 0.9600 | +0.0100 |" in out
    assert "| 1 | 0.9300 | 0.9400 | -0.0100 | 0.9600 | 0.9500 | +0.0100 |" in out
    assert "test Dice difference: mean +0.00000, sd 0.0141" in out   # seed 2: one side only
    assert "val Dice difference: mean +0.01000, sd 0.0000" in out
    # equal steps: only step 100 was validated in all four runs (seed 1's base skipped 200)
    assert "| 100 | -0.0100 | +0.0200 | +0.0050 [" in out
    assert "| 200 |" not in out and "| 300 |" not in out


def test_unet_from_loads_the_same_weights_and_refuses_another_setup(tmp_path):
    """--unet-from: the U-Net of an earlier run comes back weight for weight, and a run
    trained with other baseline settings or minutes is refused, not compared."""
    import bench_quality
    from utils import TrainConfig

    cfg = TrainConfig(image_size=32, base_channels=8, batch_size=4)
    unet = bench_quality.Deterministic(cfg)
    (tmp_path / "unet").mkdir()
    torch.save({"kind": "bench_quality U-Net baseline", "unet": unet.state_dict(),
                "config": cfg.to_dict(), "steps": 7, "epochs": 1, "best_val_dice": 0.5,
                "val_history": [[7, 0.5, 0.3]]}, tmp_path / "unet" / "best_val_dice.pt")
    (tmp_path / "results.json").write_text(json.dumps({"minutes": 10.0}))

    loaded, info = bench_quality.load_baseline(tmp_path, cfg, 10.0)
    for name, value in unet.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert info == {"steps": 7, "epochs": 1, "best_val_dice": 0.5, "val_history": [[7, 0.5, 0.3]]}
    with pytest.raises(SystemExit, match="batch_size"):
        bench_quality.load_baseline(tmp_path, TrainConfig(image_size=32, base_channels=8,
                                                          batch_size=8), 10.0)
    with pytest.raises(SystemExit, match="minutes"):
        bench_quality.load_baseline(tmp_path, cfg, 20.0)


def test_rescore_replays_the_best_checkpoint_rule_over_the_logged_validations(tmp_path):
    """rescore.weights_by_rule: the step this commit's best_iou.pt rule lands on, read from
    metrics.csv, and the checkpoint file holding it."""
    import rescore
    from utils import CHECKPOINT_VERSION, TrainConfig, save_checkpoint
    folder = tmp_path / "ddpm"
    folder.mkdir()
    rows = ["epoch,step,loss,val_mse,val_iou", "1,100,0.5,,", "1,100,,0.2,0.900",
            "2,200,,0.2,0.9400", "3,300,,0.2,0.9392", "4,400,,0.2,0.920", "5,500,,0.2,0.9395"]
    (folder / "metrics.csv").write_text("\n".join(rows) + "\n")
    config = TrainConfig(min_delta=1e-3).to_dict()
    for name, step in (("best_iou.pt", 300), ("last.pt", 500)):
        save_checkpoint({"format_version": CHECKPOINT_VERSION, "model": {}, "config": config,
                         "step": step}, folder / name)
    # 0.9392 and 0.9395 are within 0.001 of 0.9400, 0.920 is not: the last tie, step 500
    assert rescore.weights_by_rule(folder) == ("last.pt", 500)
    save_checkpoint({"format_version": CHECKPOINT_VERSION, "model": {}, "config": config,
                     "step": 400}, folder / "last.pt")
    with pytest.raises(SystemExit, match="step 500"):
        rescore.weights_by_rule(folder)
    (folder / "metrics.csv").write_text("\n".join(rows[:5]) + "\n")    # to step 300
    assert rescore.weights_by_rule(folder) == ("best_iou.pt", 300)
