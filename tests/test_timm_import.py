"""hefeat.extract.timm_import: timm imported without torch._dynamo, each in a fresh process (what a process
has imported cannot be undone in this one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads([x for x in p.stdout.splitlines() if x.startswith("REPORT ")][-1].removeprefix("REPORT "))


def test_timm_imports_without_dynamo_and_dynamo_is_whole_afterwards():
    """After import_timm: timm and torchvision are imported, torch._dynamo is not; torch.compiler.disable is
    torch's again; the methods timm decorated with it behave as the undecorated ones in eager mode; torchvision's
    is_compile_supported and a later `import torch._dynamo` give the real module's objects."""
    rep = _run("""
        import json, sys
        import torch
        real_disable = torch.compiler.disable
        from hefeat.extract.timm_import import import_timm
        import_timm()
        rep = {"timm": "timm" in sys.modules, "torchvision": "torchvision" in sys.modules,
               "dynamo_after_import": "torch._dynamo" in sys.modules, "sympy": "sympy" in sys.modules,
               "disable_restored": torch.compiler.disable is real_disable}
        from timm.layers.typing import disable_compiler
        def f(x, *, k=1):
            return x * 2 + k
        g = disable_compiler(f)
        rep["wrapped_call"] = [g(3), g(3, k=5)]
        rep["wrapped_name"] = g.__name__
        rep["dynamo_after_call"] = "torch._dynamo" in sys.modules  # the first call applies the real disable
        ra = sys.modules["torchvision.ops.roi_align"]
        import torch._dynamo
        from torch._dynamo.utils import is_compile_supported
        rep["is_compile_supported"] = ra.is_compile_supported("cpu") == is_compile_supported("cpu")
        rep["real_dynamo"] = hasattr(torch._dynamo, "optimize") and torch._dynamo.__file__ is not None
        print("REPORT " + json.dumps(rep))
    """)
    assert rep == {"timm": True, "torchvision": True, "dynamo_after_import": False, "sympy": False,
                   "disable_restored": True, "wrapped_call": [7, 11], "wrapped_name": "f", "dynamo_after_call": True,
                   "is_compile_supported": True, "real_dynamo": True}


def test_any_other_use_of_dynamo_during_the_import_loads_the_real_module():
    """A module that asks the placeholder for anything else while timm imports (simulated: a finder that runs
    when timm.layers.typing is imported) gets the real torch._dynamo, loaded there and then; the import succeeds."""
    rep = _run("""
        import json, sys
        import torch
        seen = {}

        class Probe:
            def find_spec(self, name, path=None, target=None):
                if name == "timm.layers.typing" and "is_compiling" not in seen:
                    seen["is_compiling"] = sys.modules["torch._dynamo"].is_compiling
                return None

        sys.meta_path.insert(0, Probe())
        from hefeat.extract.timm_import import import_timm
        import_timm()
        import torch._dynamo
        print("REPORT " + json.dumps({"timm": "timm" in sys.modules,
                                      "real": seen["is_compiling"] is torch._dynamo.is_compiling,
                                      "placeholder_gone": getattr(torch._dynamo, "__file__", None) is not None}))
    """)
    assert rep == {"timm": True, "real": True, "placeholder_gone": True}


def test_truncated_encoder_builds_without_dynamo():
    """The stage probe and the truncated net are built on the meta device with their in-place initialisation
    skipped: torch runs normal_ on meta tensors through torch._refs, which imports torch._dynamo."""
    rep = _run("""
        import json, sys
        import torch
        from hefeat.extract.timm_import import import_timm
        import_timm()
        from hefeat.extract.encoders import create_encoder
        import warnings
        warnings.simplefilter("ignore")
        enc = create_encoder("resnet18", weights="none", layer="layer2", seed=3)
        with torch.no_grad():
            y = enc(torch.zeros(1, 3, 64, 64))
        print("REPORT " + json.dumps({"dynamo": "torch._dynamo" in sys.modules, "dim": enc.config.dim,
                                      "shape": list(y.shape)}))
    """)
    assert rep == {"dynamo": False, "dim": 128, "shape": [1, 128]}
