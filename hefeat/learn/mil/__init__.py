"""Slide-level attention multiple-instance learning on stored tile embeddings: three aggregators, one pipeline.

- `abmil`: gated-attention MIL (Ilse, Tomczak & Welling, ICML 2018): tiles -> a hidden layer -> gated
  attention weights a_i (softmax over the bag) -> slide embedding sum_i a_i h_i -> head.
- `clam`: CLAM-SB-style single-branch attention (Lu et al., Nat Biomed Eng 2021): the same gated
  attention plus, with --instance-loss, per-class instance classifiers trained on the k most and k
  least attended tiles of each bag as pseudo-labelled positives and negatives (out-of-class branches
  too, for more than two classes); bag loss 1 - w, instance loss w.
- `transmil`: a small TransMIL-style transformer aggregator (Shao et al., NeurIPS 2021): a class token
  and pre-norm multi-head self-attention layers over the bag's tiles; the class token's attention in
  the last layer is the tile attention. (TransMIL's PPEG positional encoding and Nyström attention are
  left out: bags are capped by --max-tiles instead.)

Targets: a binary or multi-class column (clinical or slides table), a continuous column (regression),
or survival from --time-col/--event-col: discrete-time negative log-likelihood over quantile bins of
the training events (Chen et al.'s PORPOISE, Cancer Cell 2022) or the Cox partial likelihood (Breslow
ties). Bags are patients (all their labelled slides pooled) when every patient's slides share the
label, else slides (--level). Splits are patient-grouped (`hefeat.learn.splits.parse_split`), each fold
stops early on a patient-grouped validation part of its training patients; class weights balance
classes; every random choice derives from --seed. Metrics on the out-of-fold bags with patient
bootstrap CIs (AUC; C-index and time-dependent AUC; Pearson r), next to the same folds' baseline:
mean-pooled features + logistic / Cox / ridge regression, each fold's penalty chosen by patient-grouped
inner cross-validation on its training bags (evaluation.baseline_tuning_rule).

Attention weights (and per-tile scores: the head applied to each tile's hidden vector, or CLAM's
instance logits) of each bag's held-out fold model are written as per-tile predictions, so heatmaps,
the explorer and SQL see them. `hefeat predict` scores new slides with the mean of the fold models.

Modules: params (the parameters), data (bags and their targets), aggregators (the torch modules),
survival (losses, bins, metrics), training (one fold), evaluation (metrics and the mean-pool
baseline), method (fit, predict, the registrations). Importing the package registers the methods.
"""

from hefeat.learn.mil.aggregators import build_net
from hefeat.learn.mil.data import (
    Targets,
    _aggregates,
    _bag_table,
    _targets,
    _tile_moments,
    mean_pooled,
)
from hefeat.learn.mil.evaluation import _baseline_scores, _metric_rows, binary_auc
from hefeat.learn.mil.method import SMALL_TEST, fit_mil, headline, predict_mil
from hefeat.learn.mil.params import TASKS, AbmilParams, ClamParams, MilParams, TransmilParams
from hefeat.learn.mil.survival import (
    _bins,
    cox_loss,
    nll_survival_loss,
    survival_risk,
    time_dependent_auc,
)
from hefeat.learn.mil.training import COX_MIN_BATCH, _Fold, _infer

__all__ = [
    "COX_MIN_BATCH", "SMALL_TEST", "TASKS", "AbmilParams", "ClamParams", "MilParams", "Targets", "TransmilParams",
    "_Fold", "_aggregates", "_bag_table", "_baseline_scores", "_bins", "_infer", "_metric_rows", "_targets",
    "_tile_moments", "binary_auc", "build_net", "cox_loss", "fit_mil", "headline", "mean_pooled",
    "nll_survival_loss", "predict_mil", "survival_risk", "time_dependent_auc",
]
