"""The tile classifiers shared by trait and receptor models (scikit-learn pipelines on standardised embeddings)."""

from __future__ import annotations

from hefeat.errors import HefeatError


def tile_classifier(head: str = "logistic", *, C: float = 1.0, seed: int = 0, max_iter: int = 3000, hidden: int = 64):
    """Standardise, then logistic regression (inverse L2 penalty C) or an MLP with `hidden` units.

    The MLP has L2 penalty 1e-2 and stops early on 10 % of its training tiles (`max_iter` epochs at most).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if head == "logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    if head == "mlp":
        return make_pipeline(StandardScaler(), MLPClassifier((hidden,), alpha=1e-2, max_iter=max_iter,
                                                             early_stopping=True, random_state=seed))
    raise HefeatError("--head must be logistic or mlp")
