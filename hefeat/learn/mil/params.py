"""Parameters of the attention-MIL methods (`hefeat fit abmil|clam|transmil`): shared ones and each aggregator's."""

from __future__ import annotations

from dataclasses import dataclass

from hefeat.errors import HefeatError
from hefeat.learn.registry import Params, check_range, param

TASKS = ("classification", "regression", "survival")


def _split_spec(v: str) -> str:
    kind, _, arg = v.partition(":")
    if kind not in ("patient-kfold", "holdout", "loo", "leave-one-patient-out"):
        raise HefeatError(f"--split must be patient-kfold:K, holdout:FILE or leave-one-patient-out, got {v!r}")
    if kind == "patient-kfold" and arg and not arg.isdigit():
        raise HefeatError(f"--split patient-kfold:K needs an integer K, got {v!r}")
    return v


@dataclass(frozen=True, kw_only=True)
class MilParams(Params):
    """Parameters shared by the attention-MIL methods (recorded with the model)."""

    extraction_id: str = param(help="Extraction whose tile embeddings form the bags (any encoder, fine-tuned ones "
                               "included: hefeat extract --encoder finetuned:<job>).",
                               flag="--extraction")
    task: str = param("classification", "What is learnt from --label (or from --time-col/--event-col).",
                      choices=TASKS)
    label: str | None = param(None, "Column of the clinical/slides table (classification, regression).")
    time_col: str = param("survival_months", "Follow-up time column (survival).")
    event_col: str = param("event", "Event indicator column, 1 = event (survival).")
    survival_loss: str = param("nll", "Survival loss: discrete-time NLL over quantile bins, or Cox.",
                               choices=("nll", "cox"))
    n_bins: int = param(4, "Quantile bins of the training event times (--survival-loss nll).")
    level: str = param("auto", "Bags per patient (slides pooled) or per slide; auto: patient when every "
                       "patient's slides share the label.", choices=("auto", "patient", "slide"))
    split: str = param("patient-kfold:5", "patient-kfold:K, holdout:FILE or leave-one-patient-out.",
                       parse=_split_spec, file=True)
    val_share: float = param(0.2, "Share of each fold's training patients for early stopping.")
    max_tiles: int = param(512, "Tiles per training bag: a random sample of this many each epoch.")
    eval_max_tiles: int = param(16384, "Tiles per bag at evaluation and prediction (a fixed sample beyond).")
    hidden: int = param(128, "Hidden units of the tile embedding.")
    dropout: float = param(0.25, "Dropout on the tile embedding.")
    epochs: int = param(40, "Training epochs at most.")
    patience: int = param(8, "Epochs without a better validation loss before stopping.")
    batch_size: int = param(1, "Bags per optimisation step (1 as in ABMIL and CLAM; larger batches pad bags; "
                         "Cox steps take at least 16).")
    lr: float = param(1e-3, "Adam learning rate.")
    weight_decay: float = param(1e-4, "Adam weight decay.")
    class_weights: bool = param(True, "Weight classes inversely to their training frequency.")
    baseline: bool = param(True, "Fit the mean-pooled baseline on the same folds.")
    n_boot: int = param(1000, "Patient bootstrap resamples of the confidence intervals.")
    ci_level: float = param(0.95, "Confidence level of the bootstrap intervals.")
    seed: int = param(0, "Seed of the folds, validation parts, tile samples, initialisation and bootstrap.")

    def validate(self) -> None:
        _split_spec(self.split)
        if self.task in ("classification", "regression") and not self.label:
            raise HefeatError(f"--task {self.task} needs --label (a clinical or slides column)")
        check_range("--val-share", self.val_share, 0, 1, lo_open=True, hi_open=True)
        check_range("--n-bins", self.n_bins, 2)
        check_range("--max-tiles", self.max_tiles, 1)
        check_range("--eval-max-tiles", self.eval_max_tiles, 1)
        check_range("--hidden", self.hidden, 2)
        check_range("--dropout", self.dropout, 0, 1, hi_open=True)
        check_range("--epochs", self.epochs, 1)
        check_range("--patience", self.patience, 1)
        check_range("--batch-size", self.batch_size, 1)
        check_range("--lr", self.lr, 0, lo_open=True)
        check_range("--weight-decay", self.weight_decay, 0)
        check_range("--n-boot", self.n_boot, 10)
        check_range("--ci-level", self.ci_level, 0, 1, lo_open=True, hi_open=True)


@dataclass(frozen=True, kw_only=True)
class AbmilParams(MilParams):
    """Parameters of `hefeat fit abmil`."""


@dataclass(frozen=True, kw_only=True)
class ClamParams(MilParams):
    """Parameters of `hefeat fit clam` (CLAM-SB)."""

    instance_loss: bool = param(False, "Add CLAM's instance-clustering loss (classification only).")
    instance_k: int = param(8, "Most/least attended tiles per bag pseudo-labelled by the instance loss.")
    instance_weight: float = param(0.3, "Weight of the instance loss (bag loss: 1 - weight).")

    def validate(self) -> None:
        super().validate()
        if self.instance_loss and self.task != "classification":
            raise HefeatError("--instance-loss needs --task classification (its pseudo-labels are classes)")
        check_range("--instance-k", self.instance_k, 1)
        check_range("--instance-weight", self.instance_weight, 0, 1, hi_open=True)


@dataclass(frozen=True, kw_only=True)
class TransmilParams(MilParams):
    """Parameters of `hefeat fit transmil`."""

    layers: int = param(2, "Self-attention layers.")
    heads: int = param(4, "Attention heads (must divide --hidden).")

    def validate(self) -> None:
        super().validate()
        check_range("--layers", self.layers, 1)
        check_range("--heads", self.heads, 1)
        if self.hidden % self.heads:
            raise HefeatError(f"--heads ({self.heads}) must divide --hidden ({self.hidden})")
