"""Issue 21 (science v3): splits, patients and statistics right; recipes typed; synth's minimum."""

from __future__ import annotations

import pytest
import yaml

from hefeat.errors import HefeatError


# ---------------------------------------------------------------------------------------------
# (h) recipe values are parsed as their declared types; errors name the key and the type
# ---------------------------------------------------------------------------------------------
def test_finetune_recipe_reads_3e_4_as_a_number_from_yaml_and_set():
    """YAML 1.1 reads `3e-4` as a string: `lr: 3e-4` and `--set lr=3e-4` failed with a str > int TypeError."""
    from hefeat.finetune.recipe import load_recipe, recipe_from_dict

    r = recipe_from_dict(yaml.safe_load("task: spots\nparams: {lr: 3e-4, epochs: '7', tta: 'false'}"))
    assert (r.lr, r.epochs, r.tta) == (3e-4, 7, False)
    assert load_recipe("stnet-finetune", {"lr": yaml.safe_load("3e-4")}).lr == 3e-4
    with pytest.raises(HefeatError, match="epochs must be int, got 'many'") as e:
        recipe_from_dict({"task": "spots", "params": {"epochs": "many"}})
    assert "\n" not in str(e.value)


def test_method_recipe_values_are_typed_and_named_in_errors():
    from hefeat.learn.recipes import load_recipe

    r = load_recipe("he2rna", ["params.lr=3e-4", "tiling.mpp=5e-1"])
    assert r.tiling["mpp"] == 0.5 and isinstance(r.tiling["mpp"], float)
    with pytest.raises(HefeatError, match=r"params\.lr must be float, got 'fast'"):
        load_recipe("he2rna", ["params.lr=fast"])
    with pytest.raises(HefeatError, match=r"tiling\.size must be int, got 'big'"):
        load_recipe("he2rna", ["tiling.size=big"])


def test_synth_with_too_few_genes_says_the_minimum(tmp_path):
    """`hefeat synth --genes 10` ended in an IndexError traceback."""
    from hefeat.slides.synth import MIN_GENES, make_cohort

    with pytest.raises(HefeatError, match=f"at least {MIN_GENES} genes") as e:
        make_cohort(tmp_path / "c", n_slides=2, n_genes=10)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# (a) a holdout split evaluates every eligible gene
# ---------------------------------------------------------------------------------------------
def _toy_data(n_patients=30, per_patient=1, n_genes=12, d=8, seed=0):
    import numpy as np

    from hefeat.learn.data import SlideLevelData

    rng = np.random.default_rng(seed)
    groups = np.repeat([f"P{i:02d}" for i in range(n_patients)], per_patient)
    n = len(groups)
    X = rng.normal(size=(n, d))
    Y = X[:, :1] * rng.uniform(0.5, 1.5, n_genes) + 0.5 * rng.normal(size=(n, n_genes))
    ids = np.array([f"S{i:03d}" for i in range(n)])
    return SlideLevelData(ids=ids, groups=groups, slides=[[s] for s in ids], X=X, Y=Y,
                          genes=[f"G{j}" for j in range(n_genes)], sites=np.array(["s1"] * n))


def test_holdout_split_evaluates_every_eligible_gene(tmp_path, monkeypatch):
    """Old main: training rows of the OOF matrix stayed NaN and the NaN filter rejected every gene."""
    from hefeat.learn import data as data_mod
    from hefeat.learn.emo import GenesParams, fit_genes

    d = _toy_data()
    monkeypatch.setattr(data_mod, "slide_level_data", lambda *a, **k: d)
    (tmp_path / "test.txt").write_text("\n".join(f"P{i:02d}" for i in range(10)))
    res = fit_genes(None, GenesParams(extraction_id="e", split=f"holdout:{tmp_path / 'test.txt'}"), "gen-x")
    assert res.summary["n_genes"] == 12 and res.summary["n_tested"] == 10
    m = res.tables["metrics"]
    assert m["spearman_r"].notna().all() and m["spearman_r"].median() > 0.5
    assert len(res.tables["oof_predictions"]) == 10
