"""The `hefeat extract` process's fixed cost (issue 22): what it imports, the garbage collector around the
imports, and that none of it changes a feature byte."""

from __future__ import annotations

import gc
import glob
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hefeat.extract.pipeline import ExtractOptions, run_extraction
from hefeat.slides.run import ingest_slides, run_tiling
from hefeat.slides.tiling import TilingParams
from hefeat.store import layout
from hefeat.store.catalog import Store
from hefeat.store.features import read_features

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--encoder", "resnet18", "--layer", "layer2", "--weights", "none", "--precision", "fp32", "--dtype", "float32",
        "--batch-size", "4", "--workers", "1"]

# `hefeat extract` as the console script runs it (main() reads sys.argv), then what the process holds.
CLI_THEN_REPORT = textwrap.dedent("""
    import gc, json, sys
    sys.argv = ["hefeat", "extract", *sys.argv[1:]]
    from hefeat.cli import main
    main(prog_name="hefeat", standalone_mode=False)
    print("REPORT " + json.dumps({"frozen": gc.get_freeze_count(), "gc_enabled": gc.isenabled(),
                                  "modules": sorted(sys.modules)}))
""")


def _tiny_store(root: Path, cohort: Path, n: int = 2) -> Store:
    st = Store.init(root)
    ingest_slides(st, sorted(glob.glob(str(cohort / "slides" / "*.tiff")))[:n])
    run_tiling(st, TilingParams(max_tiles=6))
    return st


def _cli_process(store: Store, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", CLI_THEN_REPORT, "--store", str(store.root), "--json", *args],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [x for x in p.stdout.splitlines() if x.startswith("REPORT ")][-1]
    return json.loads(line.removeprefix("REPORT "))


def _features(st: Store) -> dict[str, bytes]:
    rows = st.sql("SELECT extraction_id, slide_id FROM features_index ORDER BY 1, 2")
    return {f"{e}/{s}": read_features(st.features_path(e, s)).tobytes() for e, s in rows.itertuples(index=False)}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, cohort):
    """(store, report): one `hefeat extract` in its own process on a 2-slide store."""
    st = _tiny_store(tmp_path_factory.mktemp("cli"), cohort)
    return st, _cli_process(st, *ARGS)


def test_cli_process_freezes_what_it_imported(cli_run):
    """In its own process the extract command imports torch and timm with the collector paused, then freezes
    them (no later collection, the one at exit included, scans them) and collects again for the run."""
    _, rep = cli_run
    assert {"torch", "timm"} <= set(rep["modules"])
    assert rep["frozen"] > 100_000  # torch + timm are ~400k objects; without the freeze this is 0
    assert rep["gc_enabled"]


def test_cli_process_does_not_import_what_extraction_does_not_use(cli_run):
    """scipy (~0.3 s: tissue detection and tile QC, imported by hefeat.slides.tiling's modules) stays out of an
    extraction of tiled slides; so does torch._dynamo (~1 s with sympy: timm's and torchvision's imports and
    the stage probe's meta-device build would load it, see hefeat.extract.timm_import and encoders._on_meta)."""
    _, rep = cli_run
    for heavy in ("scipy", "torch._dynamo", "sympy"):
        assert not [m for m in rep["modules"] if m == heavy or m.startswith(heavy + ".")], heavy


def test_quiet_gc_in_a_longer_lived_process_only_pauses(monkeypatch):
    """In-process callers (tests, CliRunner) get the pause but nothing frozen; the collector's state is restored."""
    from hefeat.cli.common import HefeatGroup, quiet_gc

    monkeypatch.setattr(HefeatGroup, "own_process", False)
    before = gc.get_freeze_count()
    assert gc.isenabled()
    with quiet_gc():
        assert not gc.isenabled()
    assert gc.isenabled() and gc.get_freeze_count() == before
    gc.disable()
    try:
        with quiet_gc():
            pass
        assert not gc.isenabled()  # a caller's own pause is left as it was
    finally:
        gc.enable()


def test_cli_process_features_are_those_of_the_library_run(cli_run, tmp_path, cohort):
    """The process's start-up changes (collector, imports, encoder build) leave every feature byte as the
    in-process library run writes it, under the same extraction id."""
    st, _ = cli_run
    ref = _tiny_store(tmp_path / "lib", cohort)
    s = run_extraction(ref, encoder="resnet18", weights="none", layer="layer2", precision="fp32", dtype="float32",
                       options=ExtractOptions(batch_size=4, workers=1))
    assert len(s.ok) == 2
    a, b = _features(st), _features(ref)
    assert a.keys() == b.keys() and len(a) == 2
    assert all(a[k] == b[k] for k in a)


def test_cached_calibration_reads_no_tiles(tmp_path, cohort, monkeypatch):
    """With this machine's calibration cached, --precision auto takes it without reading the calibration sample
    (the cache key needs only the sample's shape); the choice, the id and the features are those of the run that
    measured, and the extraction's decision records that no tile was read."""
    import hefeat.extract.plan as plan
    import hefeat.extract.precision as P
    from hefeat.extract.precision import Trial

    monkeypatch.setenv("HEFEAT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(P, "measure", lambda model, sample, cands, **kw: [  # injected timings: bf16/cl wins
        Trial(c, 30.0 if c.precision == "bf16" and c.channels_last else 10.0, 0.004 if c.precision == "bf16" else 0.0)
        for c in cands])
    monkeypatch.setattr(P, "busy_machine", lambda trials, others=None: None)
    monkeypatch.setattr(P, "device_capabilities", lambda d: {"kind": "cpu", "name": "fake", "bf16": "native", "fp16": "slow"})
    kw = dict(encoder="resnet18", weights="none", layer="layer2", precision="auto", options=ExtractOptions(batch_size=4))
    first = _tiny_store(tmp_path / "a", cohort)
    a = run_extraction(first, **kw)
    assert a.extra["precision_choice"]["source"] == "measured" and a.extra["precision"] == "bf16"

    def no_reading(*a, **k):
        raise AssertionError("the calibration sample was read although the cache answers")

    monkeypatch.setattr(plan, "calibration_tiles", no_reading)
    second = _tiny_store(tmp_path / "b", cohort)
    b = run_extraction(second, **kw)
    assert b.extra["precision_choice"]["source"] == "cache" and b.extra["precision"] == "bf16"
    assert b.extra["precision_choice"]["channels_last"] is True
    eid = b.extra["extraction_id"]
    assert eid == a.extra["extraction_id"]
    rec = json.loads(layout.precision_decision_path(second.root, eid).read_text())
    assert rec["sample_tiles"] == 0 and rec["precision"] == "bf16"
    fa, fb = _features(first), _features(second)
    assert fa.keys() == fb.keys() and len(fa) == 2 and all(fa[k] == fb[k] for k in fa)
