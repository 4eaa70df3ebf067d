"""A fine-tuning recipe: task, data, backbone, optimisation and augmentation, validated up front.

Everything here decides the trained weights and is part of the job id; how a job runs (device,
workers, checkpoint interval, progress bar) is in `RunOptions` and is not.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path

from hefeat.errors import HefeatError
from hefeat.finetune.tasks import tasks

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "plateau")
AUGMENTATIONS = ("dihedral", "hed", "brightness_contrast")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FITS = ("auto", "identity", "crop", "resize", "native")


@dataclass(frozen=True)
class Recipe:
    """What a fine-tuning job trains (see configs/*-finetune.yaml for the papers' values).

    genes: 'top:N' (highest mean), 'all', a file or 'A,B,C'; default top:250 for spots, all for genes.
    fit: how tiles become the backbone's input, as extraction's --fit (auto refuses a resize that
    changes µm/px by more than 10 %; resize/crop/native say what to do instead).
    task: a registered task (hefeat.finetune.tasks): 'spots' (ST-Net: spot patches -> log-normalised
    counts), 'genes' (EMO: tiles with their sample's bulk expression, one output per gene), 'classify'
    (PathoMCH/receptors: tiles with their slide's label). labels (a task that takes them, classify):
    'trait:GENE' (high = above the cohort median of the expression dataset) or 'clinical:COLUMN'.
    """

    task: str
    tiling_id: str | None = None
    backbone: str = "densenet121"
    weights: str = "imagenet"
    input_size: int | None = None
    fit: str = "auto"
    dropout: float = 0.0
    # targets
    dataset: str = "expression"
    genes: str | None = None
    transform: str = "log1p"
    min_variance: float = 0.01
    standardize_targets: bool = True
    labels: tuple[str, ...] = ()
    exclude_mid: tuple[float, float] | None = None
    max_tiles_per_slide: int | None = None
    # split (hefeat.learn.splits spec) and validation for early stopping
    split: str = "loo"
    folds: tuple[str, ...] | None = None
    val_share: float = 0.2
    # optimisation
    optimizer: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    accumulate: int = 1
    epochs: int = 10
    steps_per_epoch: int | None = None
    schedule: str = "constant"
    warmup_steps: int = 0
    patience: int | None = None
    min_delta: float = 0.0
    grad_clip: float | None = None
    # augmentation and test-time augmentation
    augment: tuple[str, ...] = ("dihedral", "hed", "brightness_contrast")
    hed_sigma: float = 0.05
    jitter: float = 0.1
    tta: bool = True
    # numerics
    precision: str = "auto"
    seed: int = 0
    # what goes back into the store
    baseline: str = "init"
    register_fold: str | None = None
    tiling: dict | None = None  # the recipe's `tiling:` section: used (tiled if missing) when tiling_id is null

    def __post_init__(self):
        _coerce_fields(self)
        _check(self)

    def to_dict(self) -> dict:
        """Plain-dict form (recorded with the job; the job id derives from it, with the tiling resolved)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _coerce_fields(r: Recipe) -> None:
    """Every value as its declared type (YAML 1.1 reads `3e-4` as a string; `--set lr=3e-4` too)."""
    import typing

    from hefeat.learn.registry import coerce_value

    hints = typing.get_type_hints(type(r))
    for f in dataclasses.fields(r):
        try:
            v = coerce_value(getattr(r, f.name), hints[f.name], f.name)
        except HefeatError as e:
            _fail(str(e))
        object.__setattr__(r, f.name, v)


def _fail(msg: str):
    raise HefeatError(f"Bad fine-tuning recipe: {msg}")


def _check(r: Recipe) -> None:
    known = tasks()
    if r.task not in known:
        _fail(f"task {r.task!r} unknown; use one of {', '.join(known)}")
    for name, value, allowed in (("optimizer", r.optimizer, OPTIMIZERS), ("schedule", r.schedule, SCHEDULES),
                                 ("precision", r.precision, PRECISIONS), ("fit", r.fit, FITS)):
        if value not in allowed:
            _fail(f"{name} {value!r} unknown; use one of {', '.join(allowed)}")
    bad = [a for a in r.augment if a not in AUGMENTATIONS]
    if bad:
        _fail(f"augmentation {bad[0]!r} unknown; use any of {', '.join(AUGMENTATIONS)}")
    _check_backbone(r.backbone)
    if r.weights not in ("imagenet", "none") and not Path(r.weights).exists():
        _fail(f"weights {r.weights!r}: use imagenet, none or an existing file")
    positive = {"lr": r.lr, "batch_size": r.batch_size, "accumulate": r.accumulate, "epochs": r.epochs}
    for k, v in positive.items():
        if not v > 0:
            _fail(f"{k} must be > 0, got {v}")
    for k in ("steps_per_epoch", "input_size", "max_tiles_per_slide", "patience"):
        v = getattr(r, k)
        if v is not None and v < 1:
            _fail(f"{k} must be >= 1 (or null), got {v}")
    if r.input_size is not None and r.input_size < 16:
        _fail(f"input_size must be at least 16 px, got {r.input_size}")
    if not 0 <= r.val_share < 1:
        _fail(f"val_share must be in [0, 1), got {r.val_share}")
    if not 0 <= r.dropout < 1:
        _fail(f"dropout must be in [0, 1), got {r.dropout}")
    if known[r.task].labels:
        if not r.labels:
            _fail(f"task {r.task} needs labels, e.g. labels: [trait:MKI67] or [clinical:er_status]")
        for lab in r.labels:
            kind, _, name = lab.partition(":")
            if kind not in ("trait", "clinical") or not name:
                _fail(f"label {lab!r}: expected trait:GENE or clinical:COLUMN")
    elif r.labels:
        takes = " or ".join(n for n, t in known.items() if t.labels)
        _fail(f"labels are for task {takes}; task {r.task} predicts {known[r.task].predicts}")
    if r.exclude_mid is not None:
        lo, hi = r.exclude_mid
        if not 0 <= lo < 50 < hi <= 100:
            _fail("exclude_mid must be two percentiles around the median, e.g. [20, 80]")


def _check_backbone(name: str) -> None:
    import timm

    if name.startswith("hf-hub:") or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    _fail(f"unknown backbone {name!r}" + (f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"))


def recipe_from_dict(cfg: dict, overrides: dict | None = None) -> Recipe:
    """A Recipe from a YAML mapping ({task, params}) plus overrides; unknown keys fail with suggestions."""
    if not isinstance(cfg, dict) or "task" not in cfg:
        _fail(f"a recipe needs a 'task' key ({', '.join(tasks())}) and a 'params' mapping")
    params = {**(cfg.get("params") or {}), **(overrides or {})}
    if cfg.get("tiling") and "tiling" not in params:
        params["tiling"] = dict(cfg["tiling"])
    names = [f.name for f in dataclasses.fields(Recipe)]
    for k in params:
        if k not in names or k == "task":
            close = difflib.get_close_matches(k, names, n=1)
            _fail(f"unknown parameter {k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    for k in ("labels", "augment", "folds", "exclude_mid"):
        if params.get(k) is not None:
            v = params[k]
            params[k] = tuple(v) if isinstance(v, (list, tuple)) else tuple(str(v).split(","))
    if params.get("exclude_mid") is not None:
        params["exclude_mid"] = tuple(float(x) for x in params["exclude_mid"])
    try:
        return Recipe(task=cfg["task"], **params)
    except TypeError as e:
        _fail(str(e))


def load_recipe(path: str | Path, overrides: dict | None = None) -> Recipe:
    """A YAML recipe from a file or a packaged name (stnet-finetune, emo-finetune, traits-finetune)."""
    import yaml

    from hefeat.learn.recipes import recipe_dir

    p = Path(path)
    if not p.is_file():
        name = str(path).removesuffix(".yaml")
        packaged = sorted(q.name.removesuffix(".yaml") for q in recipe_dir().iterdir() if q.name.endswith("-finetune.yaml"))
        if "/" in name or name not in packaged:
            raise HefeatError(f"Recipe not found: {path} (not a file; packaged fine-tuning recipes: {', '.join(packaged)})")
        p = recipe_dir() / f"{name}.yaml"
    try:
        cfg = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise HefeatError(f"Recipe {p.name} is not valid YAML: {str(e).splitlines()[0]}") from None
    return recipe_from_dict(cfg, overrides)


@dataclass
class RunOptions:
    """How a job runs; none of these change the trained weights (so none is in the job id)."""

    device: str | None = None
    threads: int | None = None
    workers: int | None = None
    eval_batch_size: int | None = None
    checkpoint_every: int = 50
    progress: bool = False
    force: bool = False
    #: A fold (or the commit) claimed by another live process of the same job: wait for it (True), or stop
    #: with an error once this process has done every fold it could claim (False). A dead holder's claim is
    #: taken over either way.
    wait: bool = True
