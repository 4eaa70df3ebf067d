"""The method registry: Params validation, estimators, ids from input fingerprints, and a toy method
registered here appearing in fit, predict, report and recipes with no other edit."""

from __future__ import annotations

import json
import shutil
from dataclasses import FrozenInstanceError, dataclass

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from hefeat.cli import main
from hefeat.errors import HefeatError
from hefeat.learn.registry import (
    FitResult,
    Method,
    NotEstimable,
    Params,
    check_range,
    get_method,
    methods,
    param,
    register,
    unregister,
)


def cli(*args, ok=True):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, res.output
    return res


def js(*args):
    return json.loads(cli(*args, "--json").output.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# A toy method: ridge on slide means for one gene, written only here.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ToyParams(Params):
    extraction_id: str = param(help="Extraction.", flag="--extraction")
    dataset: str = param("expression", "Target table (its fingerprint enters the id).")
    gene: str = param("MKI67", "Target gene.")
    alpha: float = param(1.0, "Ridge penalty.")
    folds: tuple[int, ...] = param((2, 3), "Fold counts.")

    def validate(self):
        check_range("--alpha", self.alpha, 0, lo_open=True)


def fit_toy(store, p: ToyParams, model_id: str) -> FitResult:
    from hefeat.learn.data import slide_level_data
    from hefeat.learn.ridge import fit_ridge_heads

    d = slide_level_data(store, p.extraction_id, dataset=p.dataset, genes=[p.gene])
    if len(d.ids) < 10:
        raise NotEstimable(f"toy needs 10 samples, found {len(d.ids)}; add slides")
    fit = fit_ridge_heads(d.X, d.Y, alphas=[p.alpha])
    r = float(np.corrcoef(fit.predict(d.X)[:, 0], d.Y[:, 0])[0, 1])
    return FitResult(summary={"n": len(d.ids), "r_in_sample": r}, arrays={"coef": fit.coef, "b": fit.intercept},
                     extraction_id=p.extraction_id)


def predict_toy(store, mid, *, slides=None, top=20):
    from hefeat.learn.data import slide_tiles
    from hefeat.learn.models import load_model

    A = load_model(store, mid)["arrays"]
    n = sum(len(st.X) for st in slide_tiles(store, load_model(store, mid)["extraction_id"], slides))
    return {"model_id": mid, "slides": len(slides or []), "tiles": n, "coef_dim": int(A["coef"].shape[0])}


def plots_toy(store, mid, out):
    f = out / "toy.txt"
    f.write_text(mid)
    return [f]


TOY = Method(name="toy", prefix="toy-", params=ToyParams, fit=fit_toy, predict=predict_toy, plots=plots_toy,
             headline=lambda s: f"toy r = {s['r_in_sample']:.2f} on {s['n']} samples", summary="A toy method.",
             example="hefeat fit toy --extraction e1")


@pytest.fixture
def toy():
    register(TOY)
    try:
        yield TOY
    finally:
        unregister("toy")


@pytest.fixture
def store_copy(learned_base, tmp_path):
    """(a copy of the 40-slide store, its extraction, the cohort folder)."""
    from hefeat.store.catalog import Store

    st0, eid, _, truth = learned_base
    root = tmp_path / "st"
    shutil.copytree(st0.root, root, ignore=shutil.ignore_patterns("models", "predictions"))
    return Store(root), eid, truth.parent


def test_toy_method_appears_in_fit_predict_report_and_recipes(toy, store_copy, tmp_path):
    st, eid, cohort = store_copy
    S = ("--store", st.root)
    assert "toy" in cli("fit", "--help").output and "--alpha" in cli("fit", "toy", "--help").output
    s = js("fit", "toy", "--extraction", eid, "--alpha", "2", *S)
    assert s["model_id"].startswith("toy-") and s["kind"] == "toy" and not s["cached"] and s["n"] == 40
    again = js("fit", "toy", "--extraction", eid, "--alpha", "2", *S)
    assert again["cached"] and set(again) == set(s)  # same summary shape cached or not
    assert "already fitted" in cli("fit", "toy", "--extraction", eid, "--alpha", "2", *S).output
    assert not js("fit", "toy", "--extraction", eid, "--alpha", "2", "--force", *S)["cached"]
    p = js("predict", s["model_id"], "--slides", "S01,S02", *S)
    assert p["slides"] == 2 and p["coef_dim"] == st.extraction(eid)["dim"]
    r = js("report", s["model_id"], "--out", tmp_path / "rep", *S)
    assert r["headline"].startswith("toy r = ") and (tmp_path / "rep" / "toy.txt").read_text() == s["model_id"]
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(f"method: toy\nparams: {{extraction_id: {eid}, alpha: 2}}\n")
    c = js("run", recipe, *S)
    assert c["model_id"] == s["model_id"] and c["cached"] and c["recipe"]["recipe"] == "toy"
    assert cli("fit", "toy", "--extraction", eid, "--alpha", "-1", *S, ok=False).exit_code != 0
    # A changed target table changes the id: the cached model is never returned for new data.
    expr = pd.read_parquet(cohort / "expression.parquet")
    expr.loc[expr["sample_id"] == "S01", "MKI67"] += 1.0
    expr.to_parquet(tmp_path / "expr2.parquet", index=False)
    assert cli("ingest", "expression", tmp_path / "expr2.parquet", *S).exit_code == 0
    changed = js("fit", "toy", "--extraction", eid, "--alpha", "2", *S)
    assert changed["model_id"] != s["model_id"] and not changed["cached"]


def test_params_are_frozen_coerced_and_validated():
    p = ToyParams(extraction_id="e1", folds=[4, 5], alpha="0.5")
    assert p.folds == (4, 5) and p.alpha == 0.5 and p.to_dict()["folds"] == [4, 5]
    assert ToyParams(extraction_id="e1", folds="2,7").folds == (2, 7)
    with pytest.raises(FrozenInstanceError):
        p.alpha = 3.0
    with pytest.raises(HefeatError, match="alpha"):
        ToyParams(extraction_id="e1", alpha=0)
    with pytest.raises(HefeatError, match="folds must be int"):
        ToyParams(extraction_id="e1", folds="a,b")
    from hefeat.learn.he2rna import ALL_TILE_KS, He2rnaParams
    from hefeat.learn.registry import make_params

    assert He2rnaParams(extraction_id="e", supertiles=0).ks == ALL_TILE_KS  # the paper's all-tile list
    from hefeat.learn.receptors import ReceptorParams

    assert ReceptorParams(extraction_id="e", dataset="none").dataset is None  # 'none' unsets an optional value
    with pytest.raises(HefeatError, match="Unknown parameters for ToyParams: nope"):
        make_params(ToyParams, {"extraction_id": "e", "nope": 1})


def test_registry_rules_and_builtin_prefixes():
    from hefeat.learn.registry import fittable

    prefixes = {m.prefix for m in fittable().values()}
    assert len(prefixes) == len(fittable())  # traits and transfer no longer share 'tra-'
    assert get_method("traits").prefix != get_method("transfer").prefix
    with pytest.raises(HefeatError, match="already used by genes"):
        register(Method(name="dup", prefix="gen-", params=ToyParams, fit=fit_toy, headline=str, summary="x"))
    with pytest.raises(HefeatError, match="Unknown method"):
        get_method("nope")
    assert "finetune-spots" in methods() and "finetune-spots" not in fittable()  # report/predict only


def test_estimators_are_scikit_learn_compatible():
    from sklearn.base import clone

    from hefeat.learn.nets import (
        AutoencoderCode,
        ExpressionRepresentation,
        He2rnaRegressor,
        SpotMLP,
    )
    from hefeat.learn.ridge import RidgeHeads

    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(30, 6)), rng.normal(size=(30, 2))
    for est in (RidgeHeads(pca=3), SpotMLP(8, epochs=3), ExpressionRepresentation(8, code=4, epochs=3),
                AutoencoderCode(8, code=4, epochs=3), He2rnaRegressor((8,), epochs=2, ks=(1, 2))):
        c = clone(est)
        assert c.get_params() == est.get_params() and c is not est
    bags = [rng.normal(size=(n, 6)).astype(np.float32) for n in (3, 5, 4, 6, 2, 5)]
    h = He2rnaRegressor((8,), epochs=3, ks=(1, 2), random_state=1).fit(bags, Y[:6], np.array(list("aabbcc")))
    assert h.predict(bags).shape == (6, 2) and list(h.history_.columns) == ["epoch", "train_loss", "val_loss"]
    again = clone(h).fit(bags, Y[:6], np.array(list("aabbcc")))
    np.testing.assert_allclose(again.predict(bags), h.predict(bags), rtol=1e-5)  # seeded by random_state
    assert SpotMLP(8, epochs=3).fit(X, Y).predict(X).shape == (30, 2)
    z = ExpressionRepresentation(8, code=4, epochs=3).fit(X, Y).transform(X)
    assert z.shape == (30, 4) and ((z > 0) & (z < 1)).all()
    assert pd.DataFrame(z).notna().all().all()


def test_output_units_come_from_the_registration_for_frozen_and_finetuned_kinds():
    """explore/values asks the registry (no kind ladder there): each kind's units are its method's own."""
    from hefeat.explore.values import model_units
    from hefeat.learn.registry import output_units

    genes = {"kind": "genes", "params": {"dataset": "expression", "transform": "log1p"}}
    assert model_units(genes, "ESR1") == output_units(genes, "ESR1") == "predicted log(1 + expression value)"
    assert model_units({"kind": "traits", "params": {}}, "combination") == "traits predicted high (bit code)"
    assert model_units({"kind": "finetune-classify", "params": {}}, "p_ER+") == "predicted probability of ER+"
    ft_genes = {"kind": "finetune-genes", "params": {"dataset": "expression", "transform": "log1p"}}
    assert model_units(ft_genes, "ESR1") == output_units(genes, "ESR1")
    assert model_units({"kind": "finetune-spots", "params": {}}, "A").startswith("predicted log")
    assert model_units({"kind": "emo", "params": {}}, "x") == "model output"  # a kind nobody registers
