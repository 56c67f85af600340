"""The package's layers (.importlinter, README "Layout"): `lint-imports` keeps every contract, and breaks one
when a lower layer imports a higher one."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root, config):
    return subprocess.run([str(LINT), str(config), "--no-cache"], cwd=root, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (requirements-dev.txt)")
def test_contracts_are_kept():
    result = lint(ROOT, ROOT / ".importlinter")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (requirements-dev.txt)")
def test_an_upward_import_breaks_the_layers(tmp_path):
    shutil.copytree(ROOT / "captioning", tmp_path / "captioning", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    with open(tmp_path / "captioning" / "data" / "vocab.py", "a") as f:
        f.write("\nfrom captioning.deploy import onnx_runtime  # noqa\n")
    result = lint(tmp_path, ROOT / ".importlinter")
    assert result.returncode != 0
    assert "Layers: each imports only those below it BROKEN" in result.stdout
    assert "Only the layers above deploy use the deployment runtime BROKEN" in result.stdout
