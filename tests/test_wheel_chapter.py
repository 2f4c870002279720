"""The book runs where the package is pip-installed, not cloned (as on Colab).

The wheel built from this checkout is installed into a fresh virtual environment outside the checkout; there,
vhmn is imported from that environment and finds the committed results and splits it ships (vhmn.resources), and
chapter 9 — which reads results/, data/splits/ and re-evaluates the committed checkpoint — runs under strict nbval
from a folder outside the checkout. The environment borrows this one's dependencies (torch, …) through a .pth
file instead of downloading them again; the vhmn package itself comes from the wheel only.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from _slice import REPO, real_root


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    if real_root() is None:
        pytest.skip("real CIFAR-10 not available (set VHMN_DATA)")
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(REPO)],
                   check=True, cwd=tmp, capture_output=True)
    shutil.rmtree(REPO / "build", ignore_errors=True)  # setuptools' build folder
    (wheel,) = (tmp / "dist").glob("vhmn-*.whl")
    env = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, capture_output=True)
    py = env / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                               capture_output=True, text=True).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_borrowed_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")  # appended after site-packages
    return tmp, py, wheel


def test_the_wheel_ships_what_the_chapters_read(venv):
    tmp, py, wheel = venv
    names = set(zipfile.ZipFile(wheel).namelist())
    for rel in ("results/cpu10/vhmn_s0/results.json", "results/cpu10/vhmn_s0/model-fp16.safetensors",
                "results/cpu10/vhmn_s0/eval-cifar10.json", "results/benchmarks/cpu.json", "results/robustness/cpu10.json",
                "data/splits/cifar10_frac10.json"):
        assert f"vhmn/_repo/{rel}" in names, rel
    out = subprocess.run([py, "-c", "import vhmn, vhmn.data, vhmn.resources as r; print(vhmn.__file__); print(r.repo_root()); "
                          "print(vhmn.data.SPLITS_DIR)"], check=True, capture_output=True, text=True, cwd=tmp).stdout.split()
    assert all(Path(p).is_relative_to(tmp / "venv") for p in out), out  # imported from the wheel, not the checkout


def test_chapter_9_runs_from_the_installed_wheel(venv):
    tmp, py, _ = venv
    book = tmp / "reader"
    book.mkdir()
    shutil.copy2(REPO / "book" / "09_data_efficiency.ipynb", book / "09_data_efficiency.ipynb")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(VHMN_DATA=str(real_root()), MPLBACKEND="", PATH=f"{tmp / 'venv' / 'bin'}:{env.get('PATH', '')}")
    env.pop("MPLBACKEND")
    r = subprocess.run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval", "--nbval-current-env",
                        "--rootdir", str(book), "09_data_efficiency.ipynb"], cwd=book, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout
