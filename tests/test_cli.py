"""The CLI: thin commands, --json summaries, clear errors with non-zero exits."""

from __future__ import annotations

import glob
import json

from click.testing import CliRunner

from hefeat.cli import main


def run(*args, ok=True):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, res.output
    return res


def js(*args):
    return json.loads(run(*args, "--json").output.strip().splitlines()[-1])


def test_cli_end_to_end(tmp_path, cohort, cmu_svs):
    st = tmp_path / "st"
    assert js("init", "--store", st)["store"] == str(st)
    slides = sorted(glob.glob(str(cohort / "slides" / "*.tiff")))
    assert js("ingest", "slides", *slides, "--store", st)["added"] == 8
    assert js("ingest", "slides", cmu_svs, "--mpp", "0.499", "--store", st)["added"] == 1
    assert js("ingest", "slides", *slides, "--store", st)["unchanged"] == 8
    assert js("ingest", "expression", cohort / "expression.parquet", "--store", st)["rows"] == 8 * 60
    assert js("ingest", "clinical", cohort / "clinical.csv", "--store", st)["rows"] == 8
    assert js("ingest", "spots", cohort / "spots.parquet", "--store", st)["rows"] > 50
    t = js("tile", "--mpp", "0.5", "--size", "224", "--store", st)
    assert t["ok"] == 9 and t["failed"] == {}
    assert js("tile", "--mpp", "0.5", "--size", "224", "--store", st)["already_done"] == 9
    s = js("tile", "--mpp", "0.5", "--size", "224", "--spots", "--store", st)
    assert s["ok"] == 4 and len(s["without_spots"]) == 5
    status = js("status", "--store", st)
    assert status["slides"] == 9 and len(status["tilings"]) == 2
    rows = js("sql", "SELECT slide_id, count(*) n, avg(sharpness) s FROM tiles GROUP BY 1 ORDER BY 1", "--store", st)
    assert len(rows) == 9 and all(r["n"] > 0 for r in rows)
    text = run("status", "--store", st).output
    assert "9 slides" in text


def test_cli_errors_are_one_line_and_nonzero(tmp_path, cohort):
    st = tmp_path / "st"
    run("init", "--store", st)
    r = run("ingest", "slides", tmp_path / "missing.svs", "--store", st, ok=False)
    assert r.exit_code != 0 and "not found" in r.output
    r = run("ingest", "expression", cohort / "expression.parquet", "--store", st, ok=False)
    assert r.exit_code != 0 and "match no slide" in r.output
    r = run("tile", "--store", st, ok=False)
    assert r.exit_code != 0 and "No slides" in r.output
    r = run("sql", "SELECT nope FROM nowhere", "--store", st, ok=False)
    assert r.exit_code != 0 and "SQL failed" in r.output
    f = tmp_path / "file"
    f.write_text("x")
    r = run("init", "--store", f, ok=False)
    assert r.exit_code != 0 and "is a file" in r.output
    r = run("status", "--store", tmp_path / "nostore", ok=False)
    assert r.exit_code != 0 and "hefeat init" in r.output


def test_every_command_has_help_with_example():
    from hefeat.cli import main as group

    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from walk(sub, path + [name])
        else:
            yield path

    for path in walk(group, []):
        out = run(*path, "--help").output
        assert "Example" in out, path
        assert "--store" in out or path == ["synth"], path


def test_cli_extract_export_import(tmp_path, tiled, cohort):
    import shutil

    st0, tid, _ = tiled
    st = tmp_path / "st"
    shutil.copytree(st0.root, st)
    e = js("extract", "--encoder", "resnet18", "--layer", "layer2", "--weights", "none", "--tiling", tid,
           "--precision", "fp32", "--batch-size", "32", "--store", st)
    assert e["ok"] == 8 and e["dim"] == 128 and e["failed"] == {}
    assert set(e["timings"]) == {"read_wait_s", "compute_s", "write_s", "loop_s"}
    x = js("export", "h5", tmp_path / "h5", "--extraction", e["extraction_id"], "--store", st)
    assert x["slides"] == 8
    r = run("extract", "--encoder", "nosuchnet", "--weights", "none", "--tiling", tid, "--store", st, ok=False)
    assert r.exit_code != 0 and "Unknown encoder" in r.output
    r = run("extract", "--encoder", "resnet18", "--store", st, ok=False)  # imagenet weights, hub offline
    assert r.exit_code != 0 and "unreachable" in r.output and "--weights none" in r.output
    runs = js("sql", "SELECT command, tiles_per_s FROM runs WHERE command = 'extract'", "--store", st)
    assert runs and runs[0]["tiles_per_s"] > 0


def test_cli_fit_predict_report_and_recipe(learned, tmp_path):
    st, eid, _, truth = learned
    s = js("fit", "genes", "--extraction", eid, "--truth", truth, "--store", st.root)
    assert {"model_id", "n_genes", "n_significant", "n_r2_above_0.2", "signal_recall", "null_false_calls"} <= set(s)
    p = js("predict", s["model_id"], "--top", "2", "--store", st.root)
    assert p["slides"] == 40
    r = js("report", s["model_id"], "--out", tmp_path / "rep", "--store", st.root)
    assert "genes significant at FDR 0.05" in r["headline"]
    assert all((tmp_path / "rep" / f).exists() for f in ("r_distribution.png", "top_genes.png", "proliferation.png"))
    c = js("fit", "--config", "configs/emo.yaml", "--extraction", eid, "--truth", truth, "--store", st.root)
    assert c["kind"] == "genes" and c["signal_recall"] > 0.5
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: genes\nparams: {nonsense: 1}\n")
    res = run("fit", "--config", bad, "--extraction", eid, "--store", st.root, ok=False)
    assert res.exit_code != 0 and "Unknown parameters" in res.output


def test_every_recipe_loads_and_validates():
    """Each configs/*.yaml names a known method and only known parameters."""
    import dataclasses
    import pathlib

    import yaml

    from hefeat.learn.recipes import METHODS, param_class

    for path in sorted(pathlib.Path("configs").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        if path.name == "demo.yaml" or path.name.endswith("-finetune.yaml"):  # fine-tuning: tests/test_finetune.py
            continue
        assert cfg["method"] in METHODS, path
        names = {f.name for f in dataclasses.fields(param_class(cfg["method"]))}
        assert set(cfg.get("params") or {}) <= names | {"truth"}, path


def test_cli_spatial_and_exploration_commands(learned, tmp_path):
    """Issue 5/6 commands end to end through the CLI, asserting on their --json summaries."""
    st, eid, seid, _ = learned
    S = ("--store", st.root)
    sp = js("fit", "spots", "--extraction", seid, "--genes", "top:20", *S)
    assert {"model_id", "genes_passing_sign_test", "n_patients"} <= set(sp)
    tr = js("fit", "traits", "--extraction", eid, "--trait", "MKI67", "--trait", "miR-17", "--exclude-mid", "30,70",
            "--test-share", "0.2", *S)
    assert {"test_auc_MKI67", "test_auc_miR-17", "heldout_auc_MKI67"} <= set(tr)
    h = js("hti", tr["model_id"], "--out", tmp_path / "hti.parquet", *S)
    assert h["n_slides"] == 40 and (tmp_path / "hti.parquet").exists()
    sv = js("survival", "--model", tr["model_id"], "--by", "hti", "--threshold", "0.5", "--out", tmp_path / "km.png", *S)
    assert 0 <= sv["logrank_p"] <= 1 and (tmp_path / "km.png").exists()
    c = js("cartography", tr["model_id"], "--slide", "S02", "--out", tmp_path / "c.png", *S)
    assert 0 <= c["hti"] <= 1
    rc = js("fit", "receptors", "--extraction", eid, "--label", "er_status", "--split", "site", "--tiles", "top:50", *S)
    assert {"patient_auc", "patient_auc_ci_low", "patient_auc_ci_high"} <= set(rc)
    rep = js("report", rc["model_id"], *S)
    assert "patient AUC" in rep["headline"]
    b = js("neighbors", "build", "--extraction", eid, "--index", "flat", *S)
    assert {"index_id", "type", "n_vectors", "recall_at_10"} <= set(b) and b["type"] == "flat"
    q = js("neighbors", "query", "--extraction", eid, "--tile", "S03:2", "-k", "5", "--exclude-same-slide", *S)
    assert len(q) == 5 and all(r["slide_id"] != "S03" for r in q) and {"slide_id", "tile_id", "distance"} <= set(q[0])
    pc = js("neighbors", "query", "--extraction", eid, "--physical-check", *S)
    assert 0 <= pc["adjacent_share"] <= pc["same_slide_share"] <= 1
    u = js("umap", "--extraction", eid, "--sample", "300", "--pca", "10", "--out", tmp_path / "u.png",
           "--color", "mean_r", *S)
    assert u["n"] == 300 and u["color"] == "continuous" and "mean red" in u["label"]
    # SQL sees `tiles` through the extraction's tiling only (the store has two tilings with overlapping tile ids)
    u2 = js("umap", "--extraction", eid, "--sample", "300", "--pca", "10", "--out", tmp_path / "u2.png",
            "--color", "SELECT slide_id, tile_id, mean_r AS color FROM tiles", *S)
    assert u2["umap_id"] == u["umap_id"] and u2["cached"] and u2["color"] == "continuous"
    tid = st.extraction(eid)["tiling_id"]
    hm = js("heatmap", "--slide", "S01", "--value", f"SELECT tile_id, density FROM tiles WHERE slide_id = 'S01' AND tiling_id = '{tid}'",
            "--tiling", tid, "--out", tmp_path / "h.png", *S)
    assert hm["column"] == "density" and hm["tiles"] > 0
    r = run("heatmap", "--slide", "S01", "--value", "SELECT tile_id, density FROM tiles WHERE slide_id = 'S01'",
            "--out", tmp_path / "x.png", *S, ok=False)
    assert r.exit_code != 0 and "tiling_id" in r.output  # two tilings: tile ids are ambiguous
    t = js("tiles", "show", "--tile", "S01:0", "--tiling", tid, "--out", tmp_path / "t.png", *S)
    assert t["shape"] == [224, 224, 3]
    r = run("neighbors", "query", "--extraction", eid, "--tile", "S01:99999", *S, ok=False)
    assert r.exit_code != 0 and "does not exist" in r.output
    r = run("fit", "traits", "--extraction", eid, "--trait", "NOPE", *S, ok=False)
    assert r.exit_code != 0 and "not in the expression table" in r.output
