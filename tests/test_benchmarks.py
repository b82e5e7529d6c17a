"""The benchmarks' own bookkeeping (their figures are measured by running them)."""
import sys
from pathlib import Path

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
