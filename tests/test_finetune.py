"""Issue 11: fine-tuning jobs on the synthetic cohort with a tiny backbone (timm's test_convnext).

Tiles for these tests come from small tilings (48 px at 2.5 µm/px: the same 120 µm as ST-Net-size
patches, 20x fewer pixels) so a job trains in seconds on two CPU cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hefeat.errors import HefeatError
from hefeat.finetune.job import run_job
from hefeat.finetune.recipe import RunOptions, load_recipe, recipe_from_dict
from hefeat.store.catalog import Store

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(backbone="test_convnext", weights="none", input_size=48, precision="fp32", optimizer="adam", lr=2e-3,
            batch_size=16, tta=False)


@pytest.fixture(scope="module")
def ft_store(tiled, tmp_path_factory):
    """A copy of the session store plus 48 px tilings (spots and tiles). Tests copy it again before writing."""
    from hefeat.slides.run import run_tiling
    from hefeat.slides.tiling import TilingParams

    st0, _, _ = tiled
    root = tmp_path_factory.mktemp("ft") / "store"
    shutil.copytree(st0.root, root)
    st = Store(root)
    spots = run_tiling(st, TilingParams(spots=True, size=48, mpp=2.5)).extra["tiling_id"]
    tiles = run_tiling(st, TilingParams(size=48, mpp=2.5)).extra["tiling_id"]
    return root, spots, tiles


def _copy(ft_store, tmp_path) -> Store:
    dst = tmp_path / "store"
    shutil.copytree(ft_store[0], dst)
    return Store(dst)


def _recipe(task: str, **params):
    return recipe_from_dict({"task": task, "params": {**TINY, **params}})


@pytest.fixture(scope="module")
def spots_job(ft_store, tmp_path_factory):
    """(store root, job summary) of one trained ST-Net-style job (read-only for the tests)."""
    root = tmp_path_factory.mktemp("spotsjob") / "store"
    shutil.copytree(ft_store[0], root)
    r = _recipe("spots", tiling_id=ft_store[1], split="patient-kfold:2", folds=["fold1"], epochs=8, val_share=0.0,
                genes="all")
    return root, run_job(Store(root), r, RunOptions(workers=0, threads=1, checkpoint_every=0))


def test_recipes_in_configs_load():
    """Every *-finetune.yaml recipe validates, with the papers' parameters (METHODS.md)."""
    st = load_recipe(ROOT / "configs" / "stnet-finetune.yaml")
    assert (st.task, st.backbone, st.genes, st.split, st.optimizer, st.lr, st.batch_size) == \
        ("spots", "densenet121", "top:250", "loo", "sgd", 1e-6, 32)
    assert st.tta and st.augment == ("dihedral",)
    emo = load_recipe(ROOT / "configs" / "emo-finetune.yaml")
    assert (emo.backbone, emo.optimizer, emo.lr, emo.steps_per_epoch, emo.patience, emo.min_delta, emo.epochs) == \
        ("inception_v3", "adam", 1e-6, 150, 80, 0.003, 500)
    tr = load_recipe(ROOT / "configs" / "traits-finetune.yaml")
    assert tr.labels == ("trait:MKI67", "trait:miR-17") and tr.exclude_mid == (20.0, 80.0) and tr.weights == "none"


@pytest.mark.parametrize(("task", "params", "match"), [
    ("spots", {"backbone": "densenet12"}, "unknown backbone 'densenet12'; did you mean densenet121"),
    ("spots", {"epoch": 3}, "unknown parameter 'epoch' \\(did you mean 'epochs'\\?\\)"),
    ("classify", {}, "task classify needs labels"),
    ("spots", {"optimizer": "lbfgs"}, "optimizer 'lbfgs' unknown"),
])
def test_bad_recipe_fails_in_one_line(task, params, match):
    with pytest.raises(HefeatError, match=match) as e:
        _recipe(task, **params)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("task", "params", "match"), [
    ("classify", {"labels": ("clinical:no_such_column",)}, "Missing labels: 'no_such_column' is not a column"),
    ("classify", {"labels": ("trait:NOGENE",)}, "Missing labels: trait 'NOGENE'"),
    ("spots", {"folds": ("fold9",)}, "Empty split: no fold named fold9"),
    ("spots", {"split": "patient-kfold:40"}, "patient k-fold needs 2 <= k"),
])
def test_bad_data_fails_before_training_in_one_line(ft_store, tmp_path, task, params, match):
    st = _copy(ft_store, tmp_path)
    tid = ft_store[1] if task == "spots" else ft_store[2]
    with pytest.raises(HefeatError, match=match) as e:
        run_job(st, _recipe(task, tiling_id=tid, split=params.pop("split", "patient-kfold:2"), **params),
                RunOptions(workers=0, threads=1))
    assert "\n" not in str(e.value)
    assert not list((st.root / "jobs").glob("*/fold=*/*.pt"))  # nothing trained, nothing half-written


def test_finetuned_beats_frozen_random_init_on_heldout_patients(spots_job, cohort):
    """The same backbone, fine-tuned end to end vs frozen at its random init + ridge heads (hefeat fit
    spots' head), on the same held-out patients. Measured (seed 0): median r over the 18
    composition-driven genes ~0.85 fine-tuned vs ~0.6 frozen; null genes ~0."""
    root, s = spots_job
    st = Store(root)
    truth = json.loads((cohort / "truth.json").read_text())
    t = pd.read_parquet(st.model_dir(s["job_id"]) / "frozen_vs_finetuned.parquet").set_index("gene")
    sig, null = t.loc[truth["signal_genes"]], t.loc[truth["null_genes"]]
    assert sig["mean_r_finetuned"].median() > sig["mean_r_frozen"].median() + 0.1
    assert sig["mean_r_finetuned"].median() > 0.5
    assert abs(null["mean_r_finetuned"].median()) < 0.15
    assert s["n_patients"] == 2 and s["frozen_n_patients"] == 2  # fold1's held-out patients only
    job = json.loads((st.job_dir(s["job_id"]) / "job.json").read_text())
    f1 = job["folds"][0]
    assert set(f1["train_patients"]).isdisjoint(f1["test_patients"]) and job["status"] == "finished"
    # Held-out predictions are in the predictions view, one row per spot of the test patients.
    pred = st.sql(f"SELECT * FROM predictions WHERE model_id = '{s['job_id']}'")
    assert len(pred) == s["n_spots"] and set(pred["fold"]) == {"fold1"} and "spot_id" in pred.columns
    hist = pd.read_csv(st.job_dir(s["job_id"]) / "fold=fold1" / "metrics.csv")
    assert list(hist["epoch"]) == list(range(1, 9)) and hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0]


def test_same_folds_as_the_frozen_fit(ft_store, tmp_path):
    """The job's folds are hefeat.learn.splits' folds over the same units (patients grouped)."""
    from hefeat.finetune.job import make_folds
    from hefeat.finetune.tasks import load_task
    from hefeat.learn.splits import parse_split

    st = _copy(ft_store, tmp_path)
    r = _recipe("genes", tiling_id=ft_store[2], split="patient-kfold:3", val_share=0.0)
    data = load_task(st, r)
    plans = make_folds(r, data)
    ref = parse_split("patient-kfold:3", data.units["unit_id"].to_numpy(), data.units["patient_id"].to_numpy(), seed=0)
    for p, f in zip(plans, ref, strict=True):
        assert p.name == f.name
        assert set(data.unit_of[p.test]) == set(f.test) and set(data.unit_of[p.train]) == set(f.train)


def test_training_and_prediction_keep_freed_memory(ft_store, tmp_path, monkeypatch):
    """Each fold trains and predicts inside hefeat.heap's block (activations and gradients reuse the last step's
    memory); the block is over when the job returns."""
    import hefeat.finetune.train as train
    from hefeat import heap

    monkeypatch.delenv("HEFEAT_HEAP", raising=False)
    seen = []
    for name in ("train_fold", "predict_fold"):
        real = getattr(train, name)

        def spy(*a, _real=real, _name=name, **k):
            seen.append((_name, heap.active()))
            return _real(*a, **k)

        monkeypatch.setattr(train, name, spy)
    st = _copy(ft_store, tmp_path)
    r = _recipe("spots", tiling_id=ft_store[1], split="patient-kfold:2", folds=["fold1"], epochs=1, val_share=0.0,
                genes="all")
    run_job(st, r, RunOptions(workers=0, threads=1, checkpoint_every=0))
    assert seen == [("train_fold", True), ("predict_fold", True)] and not heap.active()


def test_kill9_mid_epoch_then_resume_is_bitwise_identical(ft_store, tmp_path):
    """SIGKILL mid-epoch 2 (steps after the last checkpoint are lost); the same command resumes from the
    checkpoint and ends with exactly the weights, losses and predictions of an uninterrupted run (that one
    ran with no DataLoader worker; the killed and the resumed run with one)."""
    import torch

    recipe = {"task": "spots", "params": {**TINY, "tiling_id": ft_store[1], "split": "patient-kfold:2",
                                          "folds": ["fold1"], "epochs": 3, "val_share": 0.3, "dropout": 0.2,
                                          "batch_size": 8, "genes": "all", "baseline": "none",
                                          "augment": ["dihedral", "hed", "brightness_contrast"]}}
    cfg = tmp_path / "recipe.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(recipe))
    ref = _copy(ft_store, tmp_path / "ref")
    s = run_job(ref, load_recipe(cfg), RunOptions(workers=0, threads=1, checkpoint_every=3))
    crash = _copy(ft_store, tmp_path / "crash")
    cmd = [sys.executable, "-m", "hefeat.cli", "finetune", "run", "--config", str(cfg), "--store", str(crash.root),
           "--workers", "1", "--threads", "1", "--checkpoint-every", "3", "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    per_epoch = json.loads((ref.job_dir(s["job_id"]) / "fold=fold1" / "done.json").read_text())["steps_per_epoch"]
    kill_at = per_epoch + 4  # mid-epoch 2, one step after a step checkpoint (every 3 steps) or the epoch's
    killed = subprocess.run(cmd, env={**env, "HEFEAT_FAULT": f"step@{kill_at}"}, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    fold = crash.job_dir(s["job_id"]) / "fold=fold1"
    ck = torch.load(fold / "last.pt", weights_only=True)["state"]
    last_ck = max(per_epoch, (kill_at - 1) // 3 * 3)
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (1, last_ck - per_epoch, last_ck)
    assert len(ck["history"]) == 1 and not (fold / "final.pt").exists()
    from click.testing import CliRunner

    from hefeat.cli import main

    resumed = CliRunner().invoke(main, cmd[3:])  # the same command, run again (here in this process)
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.output)["job_id"] == s["job_id"]
    for name in ("final.pt", "best.pt"):
        a = torch.load(ref.job_dir(s["job_id"]) / "fold=fold1" / name, weights_only=True)["model"]
        b = torch.load(fold / name, weights_only=True)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = pd.read_csv(ref.job_dir(s["job_id"]) / "fold=fold1" / "metrics.csv")
    hb = pd.read_csv(fold / "metrics.csv")
    pd.testing.assert_frame_equal(ha[["epoch", "train_loss", "val_loss", "best_epoch"]],
                                  hb[["epoch", "train_loss", "val_loss", "best_epoch"]], check_exact=True)
    pa = np.load(ref.job_dir(s["job_id"]) / "fold=fold1" / "predictions.npz")["pred"]
    pb = np.load(fold / "predictions.npz")["pred"]
    assert np.array_equal(pa, pb)
    assert not list(fold.glob(".*tmp-*"))  # the killed process's temporary files were cleaned up


def test_registered_encoder_extracts_reproduces_the_head_and_fit_genes_runs(spots_job, ft_store, tmp_path):
    """`hefeat extract --encoder finetuned:<job>` gives the fine-tuned backbone's features with provenance;
    features @ gene_head == the job's own held-out prediction; stage-2 methods run on them."""
    from click.testing import CliRunner

    from hefeat.cli import main
    from hefeat.finetune.register import gene_head
    from hefeat.learn.emo import GenesParams
    from hefeat.learn.registry import fit_model
    from hefeat.store.features import read_features

    root, s = spots_job
    dst = tmp_path / "store"
    shutil.copytree(root, dst)
    st = Store(dst)
    jid = s["job_id"]
    run = CliRunner().invoke(main, ["extract", "--encoder", f"finetuned:{jid}", "--tiling", ft_store[1], "--precision",
                                    "fp32", "--dtype", "float32", "--workers", "0", "--store", str(dst), "--json"])
    assert run.exit_code == 0, run.output
    eid = json.loads(run.output)["extraction_id"]
    ext = st.extraction(eid)
    assert (ext["encoder"], ext["dim"], ext["source_job_id"], ext["source_fold"]) == (f"finetuned:{jid}:fold1", 64, jid, "fold1")
    job = json.loads((st.job_dir(jid) / "job.json").read_text())
    assert ext["source_train_patients"].split(",") == job["folds"][0]["train_patients"]
    pred = st.sql(f"SELECT * FROM predictions WHERE model_id = '{jid}'")
    gene = pd.read_parquet(st.model_dir(jid) / "metrics.parquet").sort_values("mean_r").iloc[-1]["gene"]
    w, b = gene_head(st, jid, gene)
    for sid, g in pred.groupby("slide_id"):
        F = read_features(st.features_path(eid, sid), g["tile_id"].to_numpy())
        np.testing.assert_allclose(F @ w + b, g[gene].to_numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(HefeatError, match="has no output 'NOPE'"):
        gene_head(st, jid, "NOPE")
    # Every stage-2 method reads it like any extraction: per-gene heads on slide means (EMO-average).
    tiles_eid = run_extraction_cli(dst, f"finetuned:{jid}", ft_store[2])
    g = fit_model(st, "genes", GenesParams(extraction_id=tiles_eid, split="patient-kfold:3"))
    assert g["n_genes"] > 10 and g["n_samples"] == 8 and np.isfinite(g["median_spearman_r"])


def run_extraction_cli(store_root: Path, encoder: str, tiling: str) -> str:
    from click.testing import CliRunner

    from hefeat.cli import main

    run = CliRunner().invoke(main, ["extract", "--encoder", encoder, "--tiling", tiling, "--precision", "fp32",
                                    "--workers", "0", "--store", str(store_root), "--json"])
    assert run.exit_code == 0, run.output
    return json.loads(run.output)["extraction_id"]


def test_emo_one_network_many_genes_with_readable_heads_and_cost(ft_store, tmp_path):
    """EMO as one multi-output network: slide prediction = mean of tile predictions; every gene's head is a
    row of the last layer; the cost ratio vs per-gene CNNs comes from counted FLOPs."""
    st = _copy(ft_store, tmp_path)
    r = _recipe("genes", tiling_id=ft_store[2], split="patient-kfold:2", folds=["fold1"], epochs=2, val_share=0.0,
                steps_per_epoch=3)
    s = run_job(st, r, RunOptions(workers=0, threads=1))
    m = pd.read_parquet(st.model_dir(s["job_id"]) / "metrics.parquet")
    oof = pd.read_parquet(st.model_dir(s["job_id"]) / "oof_predictions.parquet")
    assert 40 < s["n_genes"] == len(m) <= 60  # genes with training variance > 0.01 (as hefeat fit genes)
    assert {"spearman_r", "spearman_p_bh", "r2", "significant"} <= set(m.columns)
    assert len(oof) == s["n_samples"] > 0 and set(oof.columns) >= {"sample_id", "patient_id", "MKI67"}
    # Slide prediction = mean of that slide's held-out tile predictions (tile rows in the predictions view,
    # written for the 20 best genes by held-out r).
    gene = m.sort_values("spearman_r", ascending=False)["gene"].iloc[0]
    tiles = st.sql(f"SELECT slide_id, \"{gene}\" AS g FROM predictions WHERE model_id = '{s['job_id']}'")
    means = tiles.groupby("slide_id")["g"].mean()
    smap = st.sql("SELECT sample_id, slide_id FROM samples").set_index("sample_id")["slide_id"]
    np.testing.assert_allclose(oof.set_index("sample_id")[gene], means.loc[smap.loc[oof["sample_id"]]].to_numpy(),
                               rtol=1e-6)
    # Cost: genes x (backbone + 1 output) / (backbone + genes outputs), with FLOPs counted by torch.
    g, d, f = s["genes"], s["head_dim"], s["backbone_gflops_per_image"] * 1e9
    assert g == s["n_genes"] and d == 64
    assert s["cost_ratio_per_gene_vs_one_network"] == pytest.approx(g * (f + 2 * d) / (f + 2 * d * g))
    assert 1 < s["cost_ratio_at_paper_genes"] <= 17_695
    assert s["paper_gpu_hours_as_one_network"] == pytest.approx(300_000 / s["cost_ratio_at_paper_genes"])
    assert s["measured_images_per_s"] > 0 and s["images_per_network"] == 2 * 3 * 16


def test_trait_classifier_with_ood_slides_and_cli(ft_store, tmp_path):
    """PathoMCH-style: every tile labelled by its slide's trait (above the median); mid-percentile slides never
    train but are scored; slide AUC with CI for the fine-tuned and the frozen model; CLI run/status/list."""
    from click.testing import CliRunner

    from hefeat.cli import main

    st = _copy(ft_store, tmp_path)
    cfg = tmp_path / "traits.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump({"task": "classify", "tiling": {"size": 48, "mpp": 2.5}, "params": {
        **TINY, "labels": ["trait:MKI67", "clinical:er_status"], "exclude_mid": [30, 70],
        "split": "patient-kfold:2", "epochs": 1, "val_share": 0.3, "schedule": "plateau", "patience": 5,
        "max_tiles_per_slide": 12}}))
    cli = CliRunner()
    run = cli.invoke(main, ["finetune", "run", "--config", str(cfg), "--workers", "0", "--threads", "1",
                            "--store", str(st.root), "--json"])
    assert run.exit_code == 0, run.output
    s = json.loads(run.output)
    jid = s["job_id"]
    assert s["kind"] == "finetune-classify" and s["n_slides"] == 8 and s["folds"] == 2
    for lab in ("MKI67", "er_status"):
        assert 0 <= s[f"auc_{lab}"] <= 1 and f"frozen_auc_{lab}" in s
    m = pd.read_parquet(st.model_dir(jid) / "metrics.parquet")
    assert set(m["slides"]) == {"all", "in_distribution"}  # MKI67's mid slides are scored but never trained on
    data_job = json.loads((st.job_dir(jid) / "job.json").read_text())
    assert data_job["data"]["tiling_id"] == ft_store[2]  # the recipe's tiling section, found in the store
    pred = st.sql(f"SELECT slide_id, count(*) AS n FROM predictions WHERE model_id = '{jid}' GROUP BY 1")
    assert sum(f["n_test"] for f in data_job["folds"]) == pred["n"].sum() and pred["n"].max() <= 12
    again = cli.invoke(main, ["finetune", "run", "--config", str(cfg), "--store", str(st.root), "--json"])
    assert json.loads(again.output)["cached"] is True and json.loads(again.output)["job_id"] == jid
    status = json.loads(cli.invoke(main, ["finetune", "status", jid, "--store", str(st.root), "--json"]).output)
    assert [f["state"] for f in status["folds"]] == ["finished", "finished"] and status["status"] == "finished"
    listed = json.loads(cli.invoke(main, ["finetune", "list", "--store", str(st.root), "--json"]).output)
    assert [j["job_id"] for j in listed["jobs"]] == [jid]
    bad = cli.invoke(main, ["finetune", "run", "--config", str(cfg), "--set", "backbone=resnet_nope", "--store",
                            str(st.root)])
    assert bad.exit_code != 0 and "unknown backbone 'resnet_nope'" in bad.output and bad.output.count("\n") == 1


def test_ddp_two_processes_gloo_shard_by_slide(ft_store, tmp_path):
    """torchrun with 2 CPU processes (gloo): each epoch the training slides are split between the ranks
    (whole slides, disjoint, together all of them), and both ranks end with identical weights."""
    import yaml

    st = _copy(ft_store, tmp_path)
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(yaml.safe_dump({"task": "spots", "params": {
        **TINY, "tiling_id": ft_store[1], "split": "patient-kfold:2", "folds": ["fold2"], "epochs": 2,
        "val_share": 0.0, "batch_size": 8, "genes": "top:20", "baseline": "none"}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TMPDIR": str(tmp_path)}  # torchrun's torchelastic_* folder goes with the test's, not into /tmp for good
    if Path("/sys/class/net/lo").exists():  # gloo on loopback: no guessing an interface from the host name
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hefeat.cli",
           "finetune", "run", "--config", str(cfg), "--store", str(st.root), "--workers", "0", "--threads", "1",
           "--device", "cpu", "--json"]
    # 45 s on a quiet machine; the limit only stops a hang (a loaded CI machine can be 10x slower)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads(p.stdout.strip().splitlines()[-1])
    job = json.loads((st.job_dir(s["job_id"]) / "job.json").read_text())
    assert job["processes"] == 2 and job["status"] == "finished"
    done = json.loads((st.job_dir(s["job_id"]) / "fold=fold2" / "done.json").read_text())
    a, b = done["final_weights_digest_per_rank"]
    assert a == b and done["processes"] == 2
    pats = ",".join(repr(x) for x in job["folds"][0]["train_patients"])
    train_slides = set(st.sql(f"SELECT DISTINCT t.slide_id FROM tiles t JOIN slides USING (slide_id) WHERE "
                              f"t.tiling_id = '{ft_store[1]}' AND patient_id IN ({pats})")["slide_id"])
    assert len(done["slides_per_rank_per_epoch"]) == 2
    for r0, r1 in done["slides_per_rank_per_epoch"]:
        assert r0 and r1 and not set(r0) & set(r1) and set(r0) | set(r1) == train_slides


def test_report_gives_learning_curves_headline_and_frozen_vs_finetuned(spots_job, tmp_path):
    from click.testing import CliRunner

    from hefeat.cli import main

    root, s = spots_job
    run = CliRunner().invoke(main, ["report", s["job_id"], "--out", str(tmp_path), "--store", str(root), "--json"])
    assert run.exit_code == 0, run.output
    rep = json.loads(run.output)
    assert rep["headline"].startswith(f"{s['genes_passing_sign_test']} of {s['n_genes']} genes have r > 0 in enough of 2")
    assert f"{s['frozen_median_r']:.3f} frozen" in rep["headline"]
    assert sorted(Path(f).name for f in rep["files"]) == ["frozen_vs_finetuned.png", "learning_curves.png"]
    assert all(Path(f).stat().st_size > 10_000 for f in rep["files"])
    t = pd.DataFrame(rep["frozen_vs_finetuned"])
    assert {"gene", "mean_r_finetuned", "mean_r_frozen", "mean_r_difference"} <= set(t.columns) and len(t) == 50


def test_predict_applies_the_network_to_unseen_slides_and_refuses_in_sample_ones(spots_job, tmp_path):
    """`hefeat predict <job_id>` runs the registered fold's network on slides without predictions; a held-out
    slide whose predictions are removed gets exactly them back; slides of training patients are refused."""
    from click.testing import CliRunner

    from hefeat.cli import main

    root, s = spots_job
    dst = tmp_path / "store"
    shutil.copytree(root, dst)
    st = Store(dst)
    jid = s["job_id"]
    before = st.sql(f"SELECT * FROM predictions WHERE model_id = '{jid}' ORDER BY slide_id, tile_id")
    victim = before["slide_id"].iloc[0]
    st.predictions_path(jid, victim).unlink()
    cli = CliRunner()
    run = cli.invoke(main, ["predict", jid, "--store", str(dst), "--json"])
    assert run.exit_code == 0, run.output
    out = json.loads(run.output)
    job = json.loads((st.job_dir(jid) / "job.json").read_text())
    trained = set(job["folds"][0]["train_patients"])
    assert out["slides"] == 1 and out["skipped_in_sample"] and \
        set(st.slides(out["skipped_in_sample"])["patient_id"]) <= trained
    after = st.sql(f"SELECT * FROM predictions WHERE model_id = '{jid}' ORDER BY slide_id, tile_id")
    v0, v1 = before[before["slide_id"] == victim], after[after["slide_id"] == victim]
    assert set(v1["fold"]) == {"applied:fold1"} and len(v1) == len(v0) == out["tiles"]
    genes = [c for c in v0.columns if c not in ("model_id", "slide_id", "fold", "tile_id", "spot_id", "x", "y", "row", "col")]
    np.testing.assert_allclose(v1[genes].to_numpy(float), v0[genes].to_numpy(float), rtol=1e-5, atol=1e-6)
    bad = cli.invoke(main, ["predict", jid, "--slides", out["skipped_in_sample"][0], "--store", str(dst)])
    assert bad.exit_code != 0 and "would be in-sample" in bad.output


def test_a_job_stored_before_records_v3_opens_with_status_report_and_predict(spots_job, tmp_path):
    """The trained job as the code before records v3 stored it (conftest.PRE_V3: the old job id, a plain
    predictions folder): `hefeat status` lists its model, `finetune status` its folds, `hefeat report` reports it,
    and `hefeat predict` puts back a held-out slide's predictions (its other slides kept)."""
    from click.testing import CliRunner
    from conftest import as_pre_v3

    from hefeat.cli import main

    root, s = spots_job
    dst = tmp_path / "store"
    shutil.copytree(root, dst)
    old = as_pre_v3(dst, s["job_id"])
    st = Store(dst)
    cli = CliRunner()

    def run(*args):
        r = cli.invoke(main, [*args, "--store", str(dst), "--json"])
        assert r.exit_code == 0, r.output
        return json.loads(r.output)

    assert [m["model_id"] for m in run("status")["models"]] == [old]
    fs = run("finetune", "status", old)
    assert fs["job_id"] == old and fs["status"] == "finished" and [f["state"] for f in fs["folds"]] == ["finished"]
    assert run("report", old)["files"]
    before = st.sql(f"SELECT * FROM predictions WHERE model_id = '{old}' ORDER BY slide_id, tile_id")
    victim = before["slide_id"].iloc[0]
    (st.root / "predictions" / f"model={old}" / f"slide={victim}.parquet").unlink()
    out = run("predict", old)
    assert out["slides"] == 1
    after = Store(dst).sql(f"SELECT * FROM predictions WHERE model_id = '{old}' ORDER BY slide_id, tile_id")
    assert sorted(set(after["slide_id"])) == sorted(set(before["slide_id"])) and len(after) == len(before)


def _killed_child(store_root: Path, recipe, fault: str) -> int:
    """Run the job in a forked child that SIGKILLs itself at `fault`; returns its exit code."""
    import multiprocessing as mp

    def child():
        if ":" in fault:  # a store commit step (hefeat.store.faults): 'predictions.swap:kill'
            from hefeat.store import faults

            name, _, action = fault.partition(":")
            action, _, nth = action.partition("@")
            faults.arm(name, action, int(nth or 1))
        else:
            os.environ["HEFEAT_FAULT"] = fault
        run_job(Store(store_root), recipe, RunOptions(workers=0, threads=1, checkpoint_every=3))
        os._exit(0)

    p = mp.get_context("fork").Process(target=child)
    p.start()
    p.join(600)
    return p.exitcode


JOB_COMMIT_POINTS = ("encoder.backbone.write", "encoder.backbone.rename", "encoder.meta.write", "encoder.meta.rename",
                     "predictions.write@2", "predictions.rename@2", "predictions.swap", "predictions.swapped",
                     "model.arrays.write", "model.arrays.rename", "model.table.write", "model.table.rename",
                     "model.meta.write", "model.meta.rename", "model.index.write", "model.index.rename")


def test_crash_at_every_commit_point_then_resume_gives_the_uninterrupted_result(ft_store, tmp_path, crash_children):
    """One chain of crashes, each run resuming what the previous one left: inside a checkpoint write
    (temporary file written, not renamed), right after a rename, after an epoch's evaluation but before
    its checkpoint, after a fold's predictions but before the fold is marked done, and after every fold
    but before the job's results are committed, and at each step of that commit (JOB_COMMIT_POINTS: the
    encoder's files, a slide's predictions, the predictions swapped in, the model's arrays, tables, record and
    index record), where a full disk is tried too. The last run finishes; everything equals a clean run."""
    import torch

    from hefeat.finetune import job as jobmod

    r = _recipe("spots", tiling_id=ft_store[1], split="patient-kfold:2", epochs=2, val_share=0.3, dropout=0.2,
                batch_size=8, genes="top:20", baseline="none")
    from hefeat.store import faults

    ref = _copy(ft_store, tmp_path / "ref")
    seen_points, real_point = [], faults.point

    def record(name):
        seen_points.append(name)
        real_point(name)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(faults, "point", record)
        s = run_job(ref, r, RunOptions(workers=0, threads=1, checkpoint_every=3))
    # Every step of the job's commit (store fault points, see test_commit_models._steps) is tried below, but
    # job.meta/job.index, written after the model's index record, which the test of a finished record tries.
    steps = {n.replace(".fsync", ".rename") for n in seen_points
             if n.startswith(("predictions.", "encoder.", "model.")) and not n.endswith(".renamed")}
    assert steps == {p.partition("@")[0] for p in JOB_COMMIT_POINTS}
    crash = _copy(ft_store, tmp_path / "crash")
    jdir = crash.job_dir(s["job_id"])

    def nothing_listed(fault):
        assert not (crash.model_dir(s["job_id"]) / "index.json").exists()  # never looks finished
        seen = Store(crash.root)  # a fresh reader: no job model listed, none of its predictions visible
        assert s["job_id"] not in seen.sql("SELECT model_id FROM models")["model_id"].tolist(), fault
        assert seen.sql(f"SELECT count(*) n FROM predictions WHERE model_id = '{s['job_id']}'")["n"][0] == 0, fault

    for fault in ("ckpt-tmp@3", "ckpt-renamed@6", "epoch-end@1", "fold-done", "job-commit"):
        assert _killed_child(crash.root, r, fault) == -9, fault
        nothing_listed(fault)
    assert (jdir / "fold=fold1" / "done.json").exists() and (jdir / "fold=fold2" / "done.json").exists()
    # Killed, then out of disk, at each step of the commit: nothing half, no listing. One run up to its commit
    # (folds done: it evaluates), each crash in a child forked where the commit starts (conftest._crash_children).
    tried = []

    def check(point, action, code):
        assert code == {"kill": -9, "enospc": 3}[action], (point, action)
        nothing_listed(f"{point}:{action}")
        tried.append((point, action))

    crashes = [(point, action) for point in JOB_COMMIT_POINTS for action in ("kill", "enospc")]
    crash_children(lambda: run_job(Store(crash.root), r, RunOptions(workers=0, threads=1, checkpoint_every=3)),
                   jobmod, "_commit", crashes, check)
    assert tried == crashes
    got = run_job(crash, r, RunOptions(workers=0, threads=1, checkpoint_every=3))
    assert got["cached"] is False and got["job_id"] == s["job_id"]
    for fold in ("fold1", "fold2"):
        a = torch.load(ref.job_dir(s["job_id"]) / f"fold={fold}" / "final.pt", weights_only=True)["model"]
        b = torch.load(jdir / f"fold={fold}" / "final.pt", weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)
    ma = pd.read_parquet(ref.model_dir(s["job_id"]) / "metrics.parquet")
    mb = pd.read_parquet(crash.model_dir(s["job_id"]) / "metrics.parquet")
    pd.testing.assert_frame_equal(ma, mb, check_exact=True)
    for folder in (jdir, crash.model_dir(s["job_id"])):  # dead processes' temporary files are gone
        assert not [p for p in folder.rglob("*") if ".tmp-" in p.name], folder


def test_a_fold_claimed_by_a_live_process_is_left_to_it_and_a_dead_holders_claim_is_taken_over(ft_store, tmp_path,
                                                                                                 monkeypatch):
    """Two processes of one job never train a fold (or commit) at once: a fold whose claim a live process holds
    is skipped — with --no-wait the run does the other fold and stops, naming the holder; waiting, it looks
    again after a pause and takes the claim over once its holder is dead (as it does the commit's claim)."""
    import socket

    from hefeat.finetune import job as jobmod
    from hefeat.finetune.tasks import load_task
    from hefeat.learn.models import model_exists
    from hefeat.store import layout

    st = _copy(ft_store, tmp_path)
    r = _recipe("spots", tiling_id=ft_store[1], split="patient-kfold:2", epochs=1, val_share=0.0, genes="top:20",
                baseline="none")
    jid = jobmod.job_id(r, jobmod.data_fingerprints(load_task(st, r)), "fp32")
    jdir = st.job_dir(jid)
    opts = dict(workers=0, threads=1, checkpoint_every=0)

    def live_claim(path: Path) -> subprocess.Popen:
        """A claim held by a live process of this host (it runs until killed)."""
        holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "started": "now"}))
        return holder

    def recorded() -> dict:
        """The folds' commit records (the per-slide runner's, stage finetune, the job id as key): {fold: state}."""
        from hefeat.store.records import read_record

        folder = layout.status_dir(st.root, layout.FOLD_STAGE, jid)
        return {p.stem: read_record(p)["state"] for p in sorted(folder.glob("*.json"))} if folder.exists() else {}

    fold1 = layout.fold_dir_in(jdir, "fold1")
    h1 = live_claim(layout.fold_claim_path(jdir, "fold1"))
    h2 = None
    try:
        with pytest.raises(HefeatError, match=f"fold1 is held by {socket.gethostname()}:{h1.pid}") as e:
            run_job(st, r, RunOptions(**opts, wait=False))
        assert "\n" not in str(e.value)
        assert (layout.fold_dir_in(jdir, "fold2") / "done.json").exists()  # the free fold is trained
        assert not [p.name for p in fold1.iterdir() if p.name != "claim.lock"]  # the held one is not touched
        assert json.loads((fold1 / "claim.lock").read_text())["pid"] == h1.pid  # nor its claim
        assert not model_exists(st, jid)  # no commit, and no claim of ours left behind
        assert [p.relative_to(jdir).as_posix() for p in jdir.rglob("*.lock")] == ["fold=fold1/claim.lock"]
        from hefeat.finetune.report import job_status

        states = {f["name"]: f["state"] for f in job_status(st, jid)["folds"]}
        assert states == {"fold1": f"training (claimed by {socket.gethostname()}:{h1.pid})", "fold2": "finished"}
        assert recorded() == {"fold2": "ok"}  # a finished fold has a commit record like a slide's
        # A fold whose done record has no commit record (a job trained before folds were recorded) is adopted,
        # not trained again: the waiting run below trains fold1 only.
        layout.status_path(st.root, layout.FOLD_STAGE, jid, "fold2").unlink()
        from hefeat.finetune import train as trainmod

        trained, real_train = [], trainmod.train_fold
        monkeypatch.setattr(trainmod, "train_fold", lambda s, plan, *a: trained.append(plan.name) or real_train(s, plan, *a))

        pauses = []

        def pause(seconds):  # the waiting run's pauses: the fold's holder dies; then the commit's holder does
            nonlocal h2
            pauses.append(seconds)
            if len(pauses) == 1:
                assert not (fold1 / "done.json").exists()
                h1.kill()
                h1.wait()
                h2 = live_claim(layout.job_commit_claim_path(st.root, jid))
            else:
                assert (fold1 / "done.json").exists() and not (fold1 / "claim.lock").exists()
                assert not model_exists(st, jid)
                h2.kill()
                h2.wait()

        monkeypatch.setattr(jobmod, "_pause", pause)
        s = run_job(st, r, RunOptions(**opts))
        assert pauses == [jobmod.WAIT_POLL_S] * 2
        assert trained == ["fold1"] and recorded() == {"fold1": "ok", "fold2": "ok"}
        assert s["job_id"] == jid and s["cached"] is False and s["folds"] == 2
        assert (fold1 / "done.json").exists() and not list(jdir.rglob("*.lock"))
        assert json.loads((jdir / "job.json").read_text())["status"] == "finished"
    finally:
        for h in (h1, h2):
            if h is not None and h.poll() is None:
                h.kill()
                h.wait()


def test_a_finished_jobs_record_is_completed_after_a_crash_and_never_rewritten_by_a_second_start(ft_store, tmp_path,
                                                                                                monkeypatch):
    """Out of disk, then killed, between the model's index record (the commit) and job.json's finished record,
    the job's model is listed while job.json says running (its encoder refused); a re-run finds the model
    committed and completes job.json from it (summary, seconds, the encoder's record), and so for the job's
    index record written after job.json. Before, the re-run returned the job as cached and job.json stayed
    running for ever.

    Then a process started on the finished job that another process commits just after this one's first look
    (the look says 'not committed', the commit lands before the start-up write) returns the job as cached and
    leaves job.json as it is. The race is made deterministic: the first model_exists call answers what it
    would have answered before the other process committed."""
    from hefeat.finetune import job as jobmod
    from hefeat.finetune.register import finished_job
    from hefeat.finetune.tasks import load_task
    from hefeat.learn import models
    from hefeat.store import faults, layout

    st = _copy(ft_store, tmp_path)
    r = _recipe("spots", tiling_id=ft_store[1], split="patient-kfold:2", folds=["fold1"], epochs=1, val_share=0.0,
                genes="top:20", baseline="none")
    opts = RunOptions(workers=0, threads=1, checkpoint_every=0)
    jid = jobmod.job_id(r, jobmod.data_fingerprints(load_task(st, r)), "fp32")
    meta = layout.job_meta_path(st.root, jid)
    faults.arm("job.meta.rename", "enospc")  # trains in this process: a forked child only commits (see below)
    try:
        with pytest.raises(OSError, match="No space"):
            run_job(st, r, opts)
    finally:
        faults.disarm()
    assert models.model_exists(st, jid) and json.loads(meta.read_text())["status"] == "running"
    with pytest.raises(HefeatError, match="is running"):
        finished_job(st, jid)
    assert _killed_child(st.root, r, "job.meta.rename:kill") == -9  # the re-run completing it is killed there
    assert json.loads(meta.read_text())["status"] == "running"
    index = layout.job_index_path(st.root, jid)  # job.json written, its index record not: completed the same way
    assert _killed_child(st.root, r, "job.index.rename:kill") == -9
    assert json.loads(meta.read_text())["status"] == "finished" and json.loads(index.read_text())["status"] == "running"
    faults.arm("job.index.rename", "enospc")
    try:
        with pytest.raises(OSError, match="No space"):
            run_job(st, r, opts)
    finally:
        faults.disarm()
    assert json.loads(index.read_text())["status"] == "running"
    s = run_job(st, r, opts)
    assert s["cached"] is True and s["job_id"] == jid
    job = json.loads(meta.read_text())
    m = json.loads(layout.model_file(st.root, jid, layout.MODEL_META).read_text())
    assert job["status"] == "finished" and job["summary"] == m["summary"] and job["seconds"] == m["seconds"]
    assert job["encoder"] == json.loads((layout.job_encoder_dir(st.root, jid) / layout.ENCODER_META).read_text())
    assert json.loads(index.read_text())["status"] == "finished"
    assert finished_job(st, jid)["encoder"]["encoder"] == f"finetuned:{jid}"

    before = meta.read_text()
    real, calls = models.model_exists, []

    def racing(store, mid):  # the start-up look happens before the other process's commit
        calls.append(mid)
        return False if len(calls) == 1 else real(store, mid)

    monkeypatch.setattr(models, "model_exists", racing)
    again = run_job(st, r, opts)
    assert len(calls) >= 2 and again["cached"] is True and again["job_id"] == jid
    assert meta.read_text() == before
    assert not list(st.job_dir(jid).rglob("*.lock"))
