"""The architecture the README promises: one-way imports between the top-level files, no
project import hidden inside a function, a train() short enough to read on one screen."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {p.stem for p in ROOT.glob("*.py")}
# each file may import only files of a lower layer (or of its own, for none here)
LAYERS = {"model": 0, "DDPM": 0, "dataset": 0, "utils": 1, "train_utils": 2,
          "main": 3, "evaluate": 3}


def project_imports(path):
    """(module, line, inside a function?) for each import of a project file in `path`."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names
                             if a.name in PROJECT)
            elif isinstance(child, ast.ImportFrom) and child.module in PROJECT:
                found.append((child.module, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def test_every_top_level_file_has_a_layer():
    assert PROJECT == set(LAYERS), PROJECT ^ set(LAYERS)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_imports_point_down_and_sit_at_the_top(name):
    for module, line, in_function in project_imports(ROOT / f"{name}.py"):
        assert not in_function, f"{name}.py:{line} imports {module} inside a function"
        assert LAYERS[module] < LAYERS[name], f"{name}.py:{line} imports {module} (not below it)"


def test_benchmarks_import_only_the_project_files_they_need_at_the_top():
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for module, line, in_function in project_imports(path):
            assert not in_function, f"{path.name}:{line} imports {module} inside a function"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["DDPM", "model", "dataset"])
def test_bottom_files_load_alone(name):
    """A notebook that imports DDPM (or model, or dataset) pulls in no trainer."""
    code = (f"import sys; import {name}; "
            f"print(sorted(m for m in sys.modules if m in {sorted(PROJECT)!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == repr([name])


def test_train_fits_on_one_screen():
    tree = ast.parse((ROOT / "train_utils.py").read_text())
    train = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert train.end_lineno - train.lineno + 1 <= 150
    assert [a.arg for a in train.args.args] == ["cfg", "resume_from", "device"]


def test_promised_names_still_import_from_train_utils():
    from train_utils import TrainConfig, cosine_beta_schedule, train  # noqa: F401
    import DDPM
    import utils
    assert cosine_beta_schedule is DDPM.cosine_beta_schedule and TrainConfig is utils.TrainConfig
