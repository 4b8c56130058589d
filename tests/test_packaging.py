"""Packaging: `pip install -r requirements.txt` installs the project in editable mode
(pyproject.toml, flat layout), so its modules import from any folder without
editing sys.path or PYTHONPATH."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_top_level_module_is_listed_in_py_modules():
    """A new module forgotten in pyproject.toml would import only from the repository root."""
    modules = {p.stem for p in ROOT.glob("*.py")}
    missing = modules - set(pyproject()["py-modules"])
    assert not missing, f"add {sorted(missing)} to py-modules in pyproject.toml"


def test_every_top_level_package_is_listed_in_packages():
    found = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    missing = found - set(pyproject()["packages"])
    assert not missing, f"add {sorted(missing)} to packages in pyproject.toml"


def test_requirements_install_the_project_itself():
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").open()]
    assert "-e ." in lines


def test_the_modules_import_from_another_folder_from_this_checkout(tmp_path):
    """What bench/, scale/'s Ray workers and the tests' subprocesses rely on."""
    names = sorted(p.stem for p in ROOT.glob("*.py")) + ["bench.common", "scale.shards"]
    code = ("import importlib.util, sys\n"
            "for name in sys.argv[1:]:\n"
            "    print(importlib.util.find_spec(name).origin)\n")
    out = subprocess.run([sys.executable, "-c", code, *names], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, ("the project is not installed: run `pip install -r "
                                 f"requirements.txt` in the repository root\n{out.stderr}")
    origins = [Path(line) for line in out.stdout.splitlines()]
    assert len(origins) == len(names)
    assert all(origin.is_relative_to(ROOT) for origin in origins), origins
