"""Shared test setup: the repository root on sys.path (reproduce/ and benchmarks/ are script folders, not
installed) and VLMEvalKit's data root redirected to a temporary folder."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def lmu_root(tmp_path_factory):
    """VLMEvalKit's data root (its own `LMUData` setting) in a temporary folder for one test module."""
    root = tmp_path_factory.mktemp("LMUData")
    old = os.environ.get("LMUData")
    os.environ["LMUData"] = str(root)
    yield root
    if old is None:
        os.environ.pop("LMUData", None)
    else:
        os.environ["LMUData"] = old


@pytest.fixture(scope="module")
def run_py(lmu_root):
    """The repository's run.py as a module (its main(argv) is what `python run.py` calls), one per test module."""
    spec = importlib.util.spec_from_file_location("dop_run", ROOT / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
