"""Structure a newcomer can rely on: the explorer's routes live in blueprints by area, and an extraction is a plan
(decided without running anything) and a run of that plan."""

from __future__ import annotations

import pytest

from hefeat.store.catalog import Store

#: The explorer's areas (hefeat/explore/routes/<area>.py, one Flask blueprint each) and the routes each serves.
AREAS = {
    "page": {"/", "/api/extractions", "/api/slides", "/api/values"},
    "maps": {"/api/umap", "/api/umap/<uid>", "/api/umap/<uid>/points.bin", "/api/umap/<uid>/values", "/api/umaps"},
    "slides": {"/dz/<slide>_files/<level>/<tile>.jpeg", "/dz/<slide>.dzi", "/api/overlay", "/api/slide/<slide>",
               "/api/tile/<eid>/<slide>/<tile>", "/api/tile/<eid>/<slide>/<tile>.png", "/api/tiles"},
    "neighbours": {"/api/index", "/api/indexes", "/api/neighbors"},
}


def route_problems(app) -> list[str]:
    """What breaks the by-area layout: a route outside a blueprint (Flask's own static route aside), a missing or
    extra blueprint, a route in another area than AREAS says."""
    by_area: dict[str, set[str]] = {}
    problems = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        area, dot, _ = rule.endpoint.partition(".")
        if not dot:
            problems.append(f"{rule.rule} is registered on the app, outside a blueprint")
            continue
        by_area.setdefault(area, set()).add(rule.rule)
    for area in sorted(set(AREAS) | set(app.blueprints)):
        if area not in app.blueprints:
            problems.append(f"blueprint {area} is missing")
        elif area not in AREAS:
            problems.append(f"blueprint {area} is not an area of the explorer")
        elif by_area.get(area, set()) != AREAS[area]:
            problems.append(f"blueprint {area} serves {sorted(by_area.get(area, set()))}, not {sorted(AREAS[area])}")
    return problems


@pytest.fixture
def empty_store(tmp_path) -> Store:
    return Store.init(tmp_path / "store")


def test_explorer_routes_are_blueprints_by_area(empty_store):
    from hefeat.explore.server import create_app

    app = create_app(empty_store).app
    assert list(app.blueprints) == list(AREAS)
    assert route_problems(app) == []


def test_route_check_finds_a_route_outside_a_blueprint_and_a_missing_blueprint(empty_store, monkeypatch):
    """The check above is not vacuous: a route added on the app and an area left unregistered are both reported."""
    from flask import Blueprint

    from hefeat.explore.routes import neighbours
    from hefeat.explore.server import create_app

    app = create_app(empty_store).app
    app.add_url_rule("/api/planted", "planted", lambda: "")
    monkeypatch.setattr(neighbours, "blueprint", lambda ctx: Blueprint("other", __name__))
    other = create_app(empty_store).app
    assert route_problems(app) == ["/api/planted is registered on the app, outside a blueprint"]
    assert route_problems(other) == ["blueprint neighbours is missing", "blueprint other is not an area of the explorer"]


def test_extraction_plan_is_decided_without_running_and_its_id_is_the_runs(tmp_path, cohort):
    """plan_extraction decides the tiling, the encoder, the precision, the id and the metadata and writes nothing;
    run_plan runs that plan: the same id, the plan's metadata as the extraction's record."""
    from hefeat.extract.pipeline import ExtractOptions, plan_extraction, run_plan
    from hefeat.slides.run import ingest_slides, run_tiling
    from hefeat.slides.tiling import TilingParams
    from hefeat.store import layout
    from hefeat.store.atomic import read_json

    st = Store.init(tmp_path / "store")
    ingest_slides(st, [cohort / "slides" / "S01.tiff"])
    tid = run_tiling(st, TilingParams(max_tiles=4)).extra["tiling_id"]
    before = sorted(p.relative_to(st.root).as_posix() for p in st.root.rglob("*") if p.is_file())
    plan = plan_extraction(st, tiling_id=tid, encoder="resnet18", weights="none", layer="layer1", precision="fp32",
                           dtype="float32", options=ExtractOptions(batch_size=4, workers=0))
    after = sorted(p.relative_to(st.root).as_posix() for p in st.root.rglob("*") if p.is_file())
    assert after == before  # nothing written, nothing run
    assert (plan.tiling_id, plan.todo, plan.precision, plan.cfg.name, plan.cfg.layer) == \
        (tid, ["S01"], "fp32", "resnet18", "layer1")
    meta = plan.metadata()
    assert (meta["extraction_id"], meta["tiling_id"], meta["dim"]) == (plan.extraction_id, tid, plan.cfg.dim)
    s = run_plan(st, plan)
    assert s.extra["extraction_id"] == plan.extraction_id and s.ok == ["S01"]
    rec = read_json(st.extraction_dir(plan.extraction_id) / layout.EXTRACTION_META)
    assert {k: v for k, v in rec.items() if k != "created"} == {k: v for k, v in meta.items() if k != "created"}
