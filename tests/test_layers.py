"""The package's layers hold: modules import only downward, imports inside functions included, and
the plain PyTorch/NumPy modules never reach Ray. The contracts live in pyproject.toml
([tool.importlinter]); import-linter checks them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` over the package found in `root` (its pyproject.toml holds the contracts)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    command = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
               "--no-cache"]  # fmt: skip
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_the_import_contracts_are_kept():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in done.stdout, done.stdout[-2000:]


def test_an_upward_import_inside_a_function_breaks_the_contract(tmp_path):
    """The check sees what a reader would miss: a core module importing the CLI inside a function,
    and a plain module reaching Ray."""
    shutil.copytree(REPO / "unet_ray", tmp_path / "unet_ray", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    model = tmp_path / "unet_ray" / "model.py"
    model.write_text(model.read_text() + "\n\ndef _upward():\n    from unet_ray import cli\n\n    return cli\n")
    losses = tmp_path / "unet_ray" / "losses.py"
    losses.write_text(losses.read_text() + "\n\ndef _ray():\n    import ray\n\n    return ray\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0, done.stdout[-3000:]
    assert "Contracts: 0 kept, 2 broken." in done.stdout, done.stdout[-3000:]
    assert "unet_ray.model -> unet_ray.cli" in done.stdout, done.stdout[-3000:]
    assert "unet_ray.losses is not allowed to import ray" in done.stdout, done.stdout[-3000:]
