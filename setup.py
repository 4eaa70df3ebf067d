"""Package list: hefeat's packages, plus configs/ (the recipes) installed as hefeat.configs.

pyproject.toml holds everything else; this file exists because a package directory outside the
package tree (configs/ at the repository root, the visible home of the recipes) cannot be mapped
with a `packages.find` table.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["hefeat*"]), "hefeat.configs"], package_dir={"hefeat.configs": "configs"})
