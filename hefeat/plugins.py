"""The built-in plug-ins, named: the modules that register methods and the encoder schemes.

Lower layers find upper-layer parts here by module name, imported on first use, so that no
lower layer imports an upper one: the method registry (learn/) imports no method module at import
time and learn/ never imports finetune/; extract/ builds a 'finetuned:<job>' encoder without
importing finetune/. A new built-in method adds its module to METHOD_MODULES.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

# Each module calls hefeat.learn.registry.register() when imported.
METHOD_MODULES = (
    "hefeat.learn.emo",
    "hefeat.learn.he2rna",
    "hefeat.learn.mil.method",
    "hefeat.learn.receptors",
    "hefeat.learn.spots",
    "hefeat.learn.traits",
    "hefeat.learn.transfer",
    "hefeat.finetune.methods",
)

# Encoder names '<scheme>:<rest>' built by 'module:function' (store, name, *, layer, seed) -> Encoder.
ENCODER_SCHEMES = {
    "finetuned": "hefeat.finetune.register:finetuned_encoder",
}


def load_methods() -> None:
    """Import every built-in method module (each registers itself; repeated calls are free)."""
    for name in METHOD_MODULES:
        importlib.import_module(name)


def encoder_scheme(name: str) -> Callable | None:
    """The factory of an encoder name's scheme ('finetuned:job' -> finetuned_encoder), or None."""
    scheme, sep, _ = name.partition(":")
    target = ENCODER_SCHEMES.get(scheme) if sep else None
    if target is None:
        return None
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)
