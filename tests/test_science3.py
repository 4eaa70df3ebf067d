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


# ---------------------------------------------------------------------------------------------
# (f) HE2RNA: undefined r is not r = 0; tile scores on the tiles' own scale. Transfer: string labels.
# ---------------------------------------------------------------------------------------------
def test_tile_scores_standardise_raw_tiles_with_their_own_statistics():
    """A super-tile net standardised raw tiles with super-tile statistics (maps on another scale)."""
    import numpy as np

    from hefeat.learn.nets import He2rnaRegressor

    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(5, 4)).astype(np.float32) for _ in range(12)]  # super-tiles: SD ~ 1
    est = He2rnaRegressor((8,), epochs=0, random_state=0).fit(bags, rng.normal(size=(12, 2)))
    v = rng.normal(size=(6, 4)).astype(np.float32)
    sd_super = np.concatenate(bags).std(0) + 1e-6
    mean_super = np.concatenate(bags).mean(0)
    raw = mean_super + 3 * (v - mean_super)  # raw tiles vary 3x more than super-tiles
    tile_mean, tile_std = mean_super, 3 * sd_super
    np.testing.assert_allclose(est.tile_scores(raw, tile_mean, tile_std), est.tile_scores(v), rtol=1e-4, atol=1e-5)
    assert np.abs(est.tile_scores(raw) - est.tile_scores(v)).max() > 1e-2  # the old, inflated scale


def test_he2rna_constant_prediction_has_undefined_r_not_zero(tmp_path, monkeypatch):
    """Old main: nan_to_num(r) = 0 for a constant prediction, and its p against the null was a real number."""
    import numpy as np
    import pandas as pd

    from hefeat.learn import data as data_mod
    from hefeat.learn import he2rna
    from hefeat.learn.he2rna import He2rnaParams, fit_he2rna

    d = _toy_data(n_patients=20, n_genes=3, d=4)
    d.Y = np.abs(d.Y) + 1
    monkeypatch.setattr(data_mod, "sample_targets", lambda *a, **k: d)
    monkeypatch.setattr(he2rna, "sample_bags", lambda store, p, slides, stats=None: [d.X[i:i + 1] for i in range(len(slides))])

    class Const:  # predicts gene 0 as a constant, the others from the features
        def set_params(self, **k):
            return self

        def fit(self, bags, Y, groups):
            self.history_ = pd.DataFrame({"epoch": [1], "loss": [0.0]})
            self.d_in_, self.n_epochs_ = 4, 1
            return self

        def predict(self, bags):
            x = np.array([b[0, 0] for b in bags])
            return np.stack([np.full(len(x), 2.0), x, x], 1)

        def state_dict(self):
            return {}

    monkeypatch.setattr(He2rnaParams, "estimator", lambda self, seed: Const())

    class FakeStore:
        root = tmp_path

        def model_dir(self, mid):
            from hefeat.store import layout

            return layout.model_file(tmp_path, mid, layout.MODEL_NET).parent

    res = fit_he2rna(FakeStore(), He2rnaParams(extraction_id="e", median_positive=False, n_untrained=1), "he2-x")
    m = res.tables["metrics"].set_index("gene")
    assert np.isnan(m.loc["G0", "pearson_r"]) and not m.loc["G0", "significant"]
    assert np.isnan(m.loc["G0", "p_vs_untrained"]) and m.loc["G0", "p_bh"] == 1.0
    assert res.summary["n_undefined_r"] == 1 and np.isfinite(m.loc["G1", "pearson_r"])


def test_transfer_string_labels_are_classes_not_nan(monkeypatch):
    import numpy as np
    import pandas as pd

    from hefeat.learn import data as data_mod
    from hefeat.learn.transfer import _labels

    clin = pd.DataFrame({"slide_id": ["S0", "S1", "S2", "S3"], "msi": ["MSS", "MSI-H", None, "MSS"],
                         "num": [1, 0, 1, np.nan]})
    monkeypatch.setattr(data_mod, "clinical_by_slide", lambda store: clin)
    data = type("D", (), {"slides": [["S0"], ["S1"], ["S2"], ["S3"]]})()
    y, classes = _labels(None, data, "msi")
    assert classes == ["MSI-H", "MSS"] and y.tolist() == [1, 0, -1, 1]
    y, classes = _labels(None, data, "num")
    assert classes == ["0", "1"] and y.tolist() == [1, 0, 1, -1]


# ---------------------------------------------------------------------------------------------
# (b) one patient identity: slides.patient_id, read through the samples view by every method
# ---------------------------------------------------------------------------------------------
def test_readme_order_gives_patient_folds_on_the_new_ids(cohort, tmp_path, monkeypatch):
    """Slides without manifest (patient = slide id), then expression, then clinical with real patient ids.

    Old main: samples kept the copied ids S01..S08, folds split by slide (a patient's two slides could
    sit in train and test) and a holdout file of patient ids was refused.
    """
    import glob

    import numpy as np
    import pandas as pd

    from hefeat.learn import data as data_mod
    from hefeat.learn.splits import assert_disjoint, group_kfold, parse_split
    from hefeat.slides.run import ingest_slides
    from hefeat.store.catalog import Store
    from hefeat.store.ingest import ingest_clinical, ingest_expression

    st = Store.init(tmp_path / "st")
    ingest_slides(st, sorted(glob.glob(str(cohort / "slides" / "*.tiff"))))
    ingest_expression(st, cohort / "expression.parquet")
    slides = sorted(st.sql("SELECT slide_id FROM slides")["slide_id"])
    pat = {s: f"P{i // 2 + 1}" for i, s in enumerate(slides)}  # two slides per patient
    pd.DataFrame({"slide_id": slides, "patient_id": [pat[s] for s in slides]}).to_csv(tmp_path / "c.csv", index=False)
    ingest_clinical(st, tmp_path / "c.csv")
    smap = st.sql("SELECT sample_id, patient_id FROM samples")
    assert dict(zip(smap["sample_id"], smap["patient_id"], strict=True)) == pat
    monkeypatch.setattr(data_mod, "finished_slides", lambda store, eid: slides)
    d = data_mod.sample_targets(st, "e")
    assert sorted(set(d.groups)) == sorted(set(pat.values()))
    for f in group_kfold(d.groups, 3, seed=0):
        assert_disjoint(d.groups, f.train, f.test)
        assert not set(d.groups[f.train]) & set(d.groups[f.test])
    (tmp_path / "test.txt").write_text("P1\n")
    (h,) = parse_split(f"holdout:{tmp_path / 'test.txt'}", d.ids, d.groups)
    assert sorted(d.ids[h.test]) == slides[:2]
    # A sample named by its patient follows the patient's slides as they are now.
    expr = pd.read_parquet(cohort / "expression.parquet").head(1).assign(sample_id="P1")
    expr.to_parquet(tmp_path / "by_patient.parquet", index=False)
    ingest_expression(st, tmp_path / "by_patient.parquet", dataset="bulk")
    got = st.sql("SELECT slide_id FROM samples WHERE dataset = 'bulk' ORDER BY 1")["slide_id"].tolist()
    assert got == slides[:2] and np.all(st.sql("SELECT patient_id FROM samples WHERE dataset='bulk'") == "P1")


# ---------------------------------------------------------------------------------------------
# (e) EMO: the paper's calls (FDR and R² together), n = patients, a null scored like the observed r
# ---------------------------------------------------------------------------------------------
def test_emo_calls_both_rules_and_counts_patients(monkeypatch):
    """Old main: n counted samples (two per patient here) and no FDR-and-R² call was reported."""
    from hefeat.learn import data as data_mod
    from hefeat.learn.emo import GenesParams, fit_genes

    d = _toy_data(n_patients=15, per_patient=2)
    monkeypatch.setattr(data_mod, "slide_level_data", lambda *a, **k: d)
    res = fit_genes(None, GenesParams(extraction_id="e", split="patient-kfold:3"), "gen-x")
    m = res.tables["metrics"]
    assert (m["n"] == 15).all() and res.summary["n_patients_tested"] == 15
    assert (m["significant_r2"] == (m["significant"] & (m["r2"] > 0.2))).all()
    assert res.summary["n_significant_r2"] == int(m["significant_r2"].sum()) > 0
    assert len(res.tables["oof_predictions"]) == 30  # predictions stay per sample


def test_permutation_null_sees_the_observed_median_shift(monkeypatch):
    """Old main: the observed r used cohort-shifted targets, the permuted null the unshifted ones."""
    import numpy as np

    from hefeat.learn import data as data_mod
    from hefeat.learn import stats
    from hefeat.learn.emo import GenesParams, fit_genes

    d = _toy_data(n_patients=24, n_genes=5)
    d.sites = np.array(["a", "b"] * 12)
    d.Y = d.Y + np.where(d.sites == "b", 5.0, 0.0)[:, None]
    monkeypatch.setattr(data_mod, "slide_level_data", lambda *a, **k: d)
    seen = []
    real = stats._by_columns  # what the observed metrics and the permuted null are both computed through
    monkeypatch.setattr(stats, "_by_columns", lambda fn, a, b, *c: (seen.append(np.array(b)), real(fn, a, b, *c))[1])
    fit_genes(None, GenesParams(extraction_id="e", split="patient-kfold:3", cohort_col="site", permutations=2), "g")
    targets = [b for b in seen if b.shape == (24, 5)]
    assert len(targets) == 3  # observed + two permutations
    for b in targets:  # every statistic is computed on all-sample-shifted targets: cohort medians agree
        np.testing.assert_allclose(np.median(b[d.sites == "a"], 0), np.median(b[d.sites == "b"], 0), atol=1e-9)


# ---------------------------------------------------------------------------------------------
# (d) fine-tuned trait jobs label, split and bootstrap by patient, as fit traits does
# ---------------------------------------------------------------------------------------------
def test_finetuned_traits_agree_with_fit_traits_on_labels_ood_and_test_patients(tiled, cohort, tmp_path, monkeypatch):
    """Old main: slide percentiles and a slide median (a patient's two slides could differ), and no
    split giving fit traits' subject-level test set."""
    import shutil

    import numpy as np
    import pandas as pd

    from hefeat.finetune import tasks
    from hefeat.finetune.job import make_folds
    from hefeat.finetune.recipe import recipe_from_dict
    from hefeat.finetune.tasks import load_task
    from hefeat.learn import stats
    from hefeat.learn.splits import group_holdout
    from hefeat.store.catalog import Store
    from hefeat.store.ingest import ingest_clinical

    st0, tid, _ = tiled
    shutil.copytree(st0.root, tmp_path / "st")
    st = Store(tmp_path / "st")
    slides = sorted(st.sql("SELECT slide_id FROM slides")["slide_id"])
    pat = {s: f"P{i // 2 + 1}" for i, s in enumerate(slides)}  # two slides per patient
    pd.DataFrame({"slide_id": slides, "patient_id": [pat[s] for s in slides]}).to_csv(tmp_path / "c.csv", index=False)
    ingest_clinical(st, tmp_path / "c.csv")
    r = recipe_from_dict({"task": "classify", "params": {
        "backbone": "test_convnext", "weights": "none", "labels": ["trait:MKI67"], "tiling_id": tid,
        "exclude_mid": [30, 70], "split": "patient-holdout:0.25", "val_share": 0.0}})
    data = load_task(st, r)
    # By hand: one log1p value per patient, high = above the patients' median, OOD = percentile in (30, 70].
    expr = pd.read_parquet(cohort / "expression.parquet").set_index("sample_id")
    v = pd.Series(np.log1p(expr.loc[slides, "MKI67"].to_numpy()), index=[pat[s] for s in slides]).groupby(level=0).mean()
    pct = v.rank(pct=True) * 100
    units = data.units.assign(label=data.unit_targets[:, 0])
    assert (units["label"].to_numpy() == (v[units["patient_id"]] > v.median()).to_numpy()).all()
    trains = pd.Series(~np.isnan(data.train_targets[:, 0])).groupby(data.unit_of).any()
    ood = ((pct > 30) & (pct <= 70))[units["patient_id"]].to_numpy()
    assert (trains.to_numpy() == ~ood).all()
    # Held out: fit traits' subject-level test set (group_holdout of the patients, same share and seed).
    (plan,) = make_folds(r, data)
    test_pat = set(units.loc[np.unique(data.unit_of[plan.test]), "patient_id"])
    all_pat = np.unique(units["patient_id"])
    assert test_pat == set(all_pat[group_holdout(all_pat, 0.25, seed=0).test])
    # The AUC's bootstrap resamples patients.
    seen = []

    def fake_auc(y, score, **k):
        seen.append(k.get("groups"))
        return {"auc": 0.5, "ci_low": 0.0, "ci_high": 1.0, "n": len(y)}

    monkeypatch.setattr(stats, "auc_with_ci", fake_auc)
    pred = np.random.default_rng(0).random((len(data.samples), 1))
    tasks._eval_classify(data, pred, np.arange(len(pred)), "s")
    boot = [g for g in seen if g is not None]
    assert boot and all(set(g) <= set(all_pat) for g in boot)


# ---------------------------------------------------------------------------------------------
# (c) HTI survival over cross-fitted maps: every patient, each map from models that never saw it
# ---------------------------------------------------------------------------------------------
def test_crossfitted_trait_maps_never_come_from_a_model_that_saw_the_patient(learned_base, tmp_path, monkeypatch):
    """Old main: maps from one model; survival only on the few held-out patients (no crossfit option)."""
    import shutil

    import pandas as pd

    from hefeat.learn import traits
    from hefeat.learn.registry import fit_model
    from hefeat.learn.traits import TraitsParams, survival
    from hefeat.store.catalog import Store

    st0, eid, _, _ = learned_base
    shutil.copytree(st0.root, tmp_path / "st", ignore=shutil.ignore_patterns("models", "predictions"))
    st = Store(tmp_path / "st")
    calls = []
    real = traits._ensemble

    def spy(p, ti, feats, draw, sids, patients, label, pool, seed):
        calls.append((seed, set(patients[pool])))
        return real(p, ti, feats, draw, sids, patients, label, pool, seed)

    monkeypatch.setattr(traits, "_ensemble", spy)
    p = TraitsParams(extraction_id=eid, exclude_mid=(30, 70), test_share=0.2, splits=2, ensemble=1, crossfit=3,
                     max_tiles_per_slide=100)
    s = fit_model(st, "traits", p)
    slides = pd.read_parquet(st.model_dir(s["model_id"]) / "slides.parquet")
    assert slides["map_from"].str.startswith("crossfit").all() and slides["map_heldout"].all()
    assert s["n_map_heldout_patients"] == slides["patient_id"].nunique() > s["n_heldout_patients"]
    for fold, g in slides.groupby("map_from"):  # the fold's models trained on none of its patients
        k = int(fold.rsplit("fold", 1)[1])
        pools = [pool for seed, pool in calls if seed == p.seed + 1000 * k]
        assert len(pools) == 2 and all(not pool & set(g["patient_id"]) for pool in pools)
    sv = survival(st, s["model_id"])
    assert sv["rule"] == "crossfit" and sv["n_excluded_trained"] == 0
    assert sv["n_high"] + sv["n_low"] + sv["n_skipped_hti_zero"] + sv["n_missing_survival"] == sv["n_patients"] >= 20
    held = survival(st, s["model_id"], rule="heldout")
    assert held["rule"] == "heldout" and held["n_high"] + held["n_low"] < sv["n_high"] + sv["n_low"]
