"""`hefeat predict`: dispatch to each model kind's prediction function."""

from __future__ import annotations

from hefeat.errors import HefeatError
from hefeat.learn.models import load_model
from hefeat.store.catalog import Store


def predict_model(store: Store, mid: str, *, slides: list[str] | None = None, top: int = 20) -> dict:
    """Write a model's predictions into the store; returns counts."""
    kind = load_model(store, mid)["kind"]
    if kind.startswith("finetune-"):  # fine-tuning jobs (hefeat.finetune); moves into the method registry
        from hefeat.finetune.predict import predict_job

        return predict_job(store, mid, slides=slides, top=top)
    if kind == "genes":
        from hefeat.learn.emo import predict_genes

        return predict_genes(store, mid, slides=slides, top=top)
    if kind == "he2rna":
        from hefeat.learn.he2rna import predict_he2rna

        return predict_he2rna(store, mid, slides=slides, top=top)
    raise HefeatError(f"Model kind {kind!r} has no tile-level predictions; its predictions are in models/{mid}/")
