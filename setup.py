"""Build hook: a wheel ships the repository files the chapters read (vhmn.resources.SHIPPED_FILES) in vhmn/_repo/.

Everything else about the package is in pyproject.toml.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED_FILES = {"results": ["**/*.json", "**/*.safetensors"], "data/splits": ["*.json"]}  # = vhmn.resources'


class build_py_with_repo_files(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads the checkout itself
            return
        dest = Path(self.build_lib) / "vhmn" / "_repo"
        for folder, patterns in SHIPPED_FILES.items():
            for pattern in patterns:
                for f in sorted((ROOT / folder).glob(pattern)):
                    out = dest / folder / f.relative_to(ROOT / folder)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, out)


setup(cmdclass={"build_py": build_py_with_repo_files})
