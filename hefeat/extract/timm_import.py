"""Import timm without importing torch._dynamo (about 1 s of a 2-core CPU's start-up), for runs that do not compile.

`import timm` imports every model module. Two module-level statements on that path import
torch._dynamo (with sympy, torch.fx's symbolic shapes, torch.distributed pieces), although nothing an
eager forward pass runs needs it:
- torchvision.ops.roi_align (timm's norm layers import torchvision.ops.misc) does
  `from torch._dynamo.utils import is_compile_supported`, a function it calls only inside roi_align;
- timm.layers.typing takes `torch.compiler.disable` as the decorator of a few methods (naflexvit),
  and `torch.compiler.disable` imports torch._dynamo when it decorates.

`import_timm(lazy_dynamo=True)` imports timm while, for the duration of that import only,
`torch._dynamo` and `torch._dynamo.utils` are placeholder modules whose `is_compile_supported` imports
the real function when it is first called, and `torch.compiler.disable` returns a wrapper that applies
the real `torch.compiler.disable` to the function when it is first called (in eager mode a disabled
function is the function itself, so calls behave the same). Any other use of the placeholders during
the import (a future torchvision or timm that needs more) loads the real torch._dynamo there and then,
so the import is never wrong, only slower. Afterwards the placeholders are gone: a later
`import torch._dynamo` (torch.compile, --compile) imports the real module as usual.

Only a caller that will not compile the model should pass lazy_dynamo=True (the extraction CLI passes
`not --compile`): a method timm decorated through the wrapper is compiled around, as torch.compiler.disable
asks, but the wrapper itself is one more Python frame for dynamo to step through.
"""

from __future__ import annotations

import functools
import importlib
import sys
import types

_NAMES = ("torch._dynamo", "torch._dynamo.utils")


def import_timm(*, lazy_dynamo: bool = True) -> None:
    """Import timm (and torchvision) now; with lazy_dynamo, without importing torch._dynamo (see the module doc)."""
    import torch

    if not lazy_dynamo or "timm" in sys.modules or any(n in sys.modules for n in _NAMES):
        import timm  # noqa: F401
        return
    real_disable = torch.compiler.disable
    placeholders: dict[str, types.ModuleType] = {}

    def real(name: str):
        """The real module `name`: the placeholders leave sys.modules first (for good)."""
        _drop(placeholders)
        return importlib.import_module(name)

    def lazy_disable(fn=None, recursive=True, **kw):
        if fn is None:  # used as @torch.compiler.disable(recursive=...)
            return lambda f: lazy_disable(f, recursive, **kw)
        disabled: list = []

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if not disabled:
                disabled.append(real_disable(fn, recursive, **kw))
            return disabled[0](*args, **kwargs)

        return call

    def is_compile_supported(device_type):
        return real("torch._dynamo.utils").is_compile_supported(device_type)

    def forward_to(name: str):
        """A placeholder's __getattr__: anything else it is asked for comes from the real module (loaded then).
        Dunder names are not forwarded: inspect and the import system probe every module for __file__ etc."""
        def get(attr: str):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return getattr(real(name), attr)
        return get

    pkg = types.ModuleType("torch._dynamo", "placeholder while timm imports (hefeat.extract.timm_import)")
    pkg.__path__ = []
    pkg.__getattr__ = forward_to("torch._dynamo")
    utils = types.ModuleType("torch._dynamo.utils", pkg.__doc__)
    utils.is_compile_supported = is_compile_supported
    utils.__getattr__ = forward_to("torch._dynamo.utils")
    pkg.utils = utils
    placeholders.update({"torch._dynamo": pkg, "torch._dynamo.utils": utils})
    sys.modules.update(placeholders)
    torch.compiler.disable = lazy_disable
    try:
        import timm  # noqa: F401
    finally:
        torch.compiler.disable = real_disable
        _drop(placeholders)


def _drop(placeholders: dict[str, types.ModuleType]) -> None:
    """Remove the placeholder modules from sys.modules and from torch's attributes (idempotent)."""
    import torch

    for name, mod in placeholders.items():
        if sys.modules.get(name) is mod:
            del sys.modules[name]
    if torch.__dict__.get("_dynamo") is placeholders.get("torch._dynamo"):
        del torch._dynamo
