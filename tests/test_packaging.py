"""What `pip install relsum` gets: the wheel holds every module, every kernel and the bundled data,
and the unpacked wheel finds its data with no checkout around it."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    # Build from a copy: a build in the checkout would leave build/ and egg-info behind it.
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("relsum_core", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    out = tmp_path_factory.mktemp("wheel")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                          "--no-index", "-q", "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    (whl,) = out.glob("relsum-*.whl")
    return whl


def _tree_files(folder: str, installed_as: str) -> set[str]:
    return {installed_as + "/" + p.relative_to(ROOT / folder).as_posix()
            for p in (ROOT / folder).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def test_wheel_holds_the_library_the_kernels_and_the_bundled_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = _tree_files("relsum_core", "relsum_core") | _tree_files("kernels", "relsum_kernels")
    assert expected - names == set()
    assert "relsum_core/bundled/esci_150q/README.md" in names  # source and licence note
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "relsum = relsum_core.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_unpacked_wheel_loads_its_own_bundled_data(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import relsum_core, relsum_kernels\n"
            "from relsum_core.data import bundled_data_dir, load_dataset\n"
            "catalog, judgments = load_dataset()\n"
            "print(relsum_core.__file__, relsum_kernels.__file__, bundled_data_dir(), len(judgments))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    # cwd outside the checkout, so nothing but the unpacked wheel can answer these imports
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    core, kernels, data_dir, n_judgments = res.stdout.split()
    for path in (core, kernels, data_dir):
        assert Path(path).is_relative_to(site), path
    assert int(n_judgments) > 4000
