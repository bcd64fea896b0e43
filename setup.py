"""Build hook: ship the Hydra configs and the shapes teacher inside the package.

The metadata is in pyproject.toml. The repository keeps ``configs/`` and ``checkpoints/shapes-teacher/`` at its top
level; a wheel can only hold files under its packages, so ``build_py`` copies them to ``ddstrans/_assets/`` in the
build directory (``ddstrans.assets`` looks there first). Editable installs skip the copy: they import ``ddstrans``
from the checkout, where ``ddstrans.assets`` finds the files in place.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# name under ddstrans/_assets/ -> source directory in the repository (keep in sync with ddstrans/assets.py)
ASSETS = {"configs": "configs", "shapes-teacher": "checkpoints/shapes-teacher"}
IGNORE = shutil.ignore_patterns("_train_state", "__pycache__", "*.pyc", "*.tmp", ".*")


class BuildPyWithAssets(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for name, source in ASSETS.items():
            src = ROOT / source
            if not src.is_dir():
                raise FileNotFoundError(f"{src}: shipped with the package, missing from the source tree")
            dst = Path(self.build_lib) / "ddstrans" / "_assets" / name
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst, ignore=IGNORE)


setup(cmdclass={"build_py": BuildPyWithAssets})
