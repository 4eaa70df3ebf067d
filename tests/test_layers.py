"""The package's layers (pyproject [tool.importlinter]) hold, and the plug-in names resolve."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    """lint-imports passes: no layer imports a higher one (learn -/-> finetune, extract -/-> finetune, ...)."""
    pytest.importorskip("importlinter")
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def test_lower_layers_load_without_upper_ones():
    """Importing the registry and the encoders loads neither finetune/ nor explore/ (checked in a fresh interpreter)."""
    code = ("import sys, hefeat.learn.registry, hefeat.extract.encoders, hefeat.extract.pipeline, hefeat.slides.run;"
            "print(sorted(m for m in sys.modules if m.startswith(('hefeat.finetune', 'hefeat.explore', 'hefeat.cli'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_plugins_name_every_builtin_method_and_the_finetuned_scheme():
    """Every built-in method module is listed (finetune's job kinds too) and 'finetuned:' finds its factory."""
    from hefeat.finetune.register import finetuned_encoder
    from hefeat.learn.registry import methods
    from hefeat.plugins import METHOD_MODULES, encoder_scheme

    names = methods()
    assert {"genes", "he2rna", "receptors", "spots", "traits", "transfer"} <= set(names)
    assert any(n.startswith("finetune-") for n in names)
    registering = {sys.modules[m.__module__].__name__ for m in (v.predict or v.fit for v in names.values()) if m}
    assert registering <= set(METHOD_MODULES)
    assert encoder_scheme("finetuned:ft-abc") is finetuned_encoder
    assert encoder_scheme("hf-hub:org/model") is None and encoder_scheme("resnet50") is None


# Modules over the size limit whose split is still to do (issue 20, step 6), with the plan.
LONG_PENDING = {
    "learn/mil.py": "arrived at 900 lines (issue 19): bag pipeline, aggregators and heads as parts",
}


def test_long_modules_say_why():
    """A module of hefeat/ over 600 lines states why in its docstring ('Over 600 lines: ...')."""
    import ast

    import hefeat

    pkg = Path(hefeat.__file__).resolve().parent
    unexplained = []
    for path in sorted(pkg.rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(pkg).as_posix()
        if text.count("\n") > 600 and rel not in LONG_PENDING and \
                "Over 600 lines:" not in (ast.get_docstring(ast.parse(text)) or ""):
            unexplained.append(rel)
    assert unexplained == []
