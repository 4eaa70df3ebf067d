"""The explorer: a safe read-only server (waitress) and the page in headless Chromium.

Server: Host header checked, GET never writes, every bad parameter is a 400 JSON error, nothing but
catalogued slides/tiles is served. Page: open a slide, overlay a model's predictions, colour the UMAP
by a clinical column, lasso a region and get its tiles, click a neighbour and land on its slide.
Screenshots go to pytest's temporary directory (printed with -s).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import threading
import urllib.parse

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import copy_store
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run", "--disable-extensions"]


def _cli(*args) -> dict:
    from hefeat.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args] + ["--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads(r.output.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def explorer(learned_base, tmp_path_factory):
    """A copy of the session store plus what the page shows: a genes model with tile predictions, a UMAP, an index."""
    from hefeat.explore.neighbors import build_index
    from hefeat.explore.umap_map import run_umap

    st0, eid, seid, _ = learned_base
    st = copy_store(st0, tmp_path_factory.mktemp("explorer") / "store40")
    g = _cli("fit", "genes", "--extraction", eid, "--store", st.root)
    p = _cli("predict", g["model_id"], "--top", "2", "--store", st.root)
    u = run_umap(st, eid, sample=600, pca=20)
    build_index(st, eid)
    return {"store": st, "eid": eid, "seid": seid, "model": g["model_id"], "gene": p["tile_genes"][0], "umap": u["umap_id"]}


@pytest.fixture(scope="module")
def server(explorer):
    from waitress.server import create_server

    from hefeat.explore.server import create_app

    srv = create_server(create_app(explorer["store"]), host="127.0.0.1", port=0, threads=4)
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    yield {**explorer, "port": srv.effective_port, "base": f"http://127.0.0.1:{srv.effective_port}"}
    srv.close()
    srv.task_dispatcher.shutdown()


def _get(server, path, *, host=None, method="GET", body=None, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=120)
    h = {"Host": host or f"127.0.0.1:{server['port']}", **(headers or {})}
    c.request(method, path, body=body, headers=h)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, r.getheader("Content-Type", ""), data


# ---- server ------------------------------------------------------------------------------------------
def test_host_header_and_origin_are_checked(server):
    ok, _, _ = _get(server, "/api/slides")
    assert ok == 200
    assert _get(server, "/api/slides", host=f"localhost:{server['port']}")[0] == 200
    for bad in ("evil.example", f"evil.example:{server['port']}", "127.0.0.1.evil.example", "[::2]"):
        status, ctype, body = _get(server, "/api/slides", host=bad)
        assert status == 403 and "json" in ctype and "not allowed" in json.loads(body)["error"], bad
    status, _, body = _get(server, "/api/index", method="POST", body=json.dumps({"extraction": server["eid"]}),
                           headers={"Content-Type": "application/json", "Origin": "http://evil.example"})
    assert status == 403 and "Origin" in json.loads(body)["error"]
    status, _, body = _get(server, "/api/index", method="POST", body="extraction=" + server["eid"],
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400 and "JSON" in json.loads(body)["error"]  # a plain cross-site form cannot compute


def test_get_never_writes_to_the_store(server, files_state):
    """Every read route, with valid parameters, leaves the store's files exactly as they were."""
    st, e, u = server["store"], server["eid"], server["umap"]
    val = urllib.parse.quote(f"model:{server['model']}:{server['gene']}")
    sql = urllib.parse.quote("SELECT slide_id, tile_id, tissue_frac AS color FROM tiles")
    paths = ["/", "/api/extractions", "/api/slides", f"/api/values?extraction={e}", f"/api/umaps?extraction={e}",
             f"/api/umap/{u}", f"/api/umap/{u}/points.bin", f"/api/umap/{u}/values?value=sharpness",
             f"/api/umap/{u}/values?value=clinical.er_status", f"/api/umap/{u}/values?value={sql}",
             f"/api/umap/{u}/values?value=umap:{u}:cluster", "/dz/S02.dzi", "/dz/S02_files/0/0_0.jpeg",
             "/dz/S02_files/11/0_0.jpeg", "/api/slide/S02", f"/api/tiles?extraction={e}&slide=S02",
             f"/api/overlay?extraction={e}&slide=S02&value={val}", f"/api/tile/{e}/S02/3.png", f"/api/tile/{e}/S02/3.png?size=64",
             f"/api/tile/{e}/S02/3", f"/api/indexes?extraction={e}",
             f"/api/neighbors?extraction={e}&slide=S02&tile=3&k=5&exclude=patient",
             "/static/vendor/openseadragon/LICENSE.txt", "/static/explorer.js"]
    before = files_state(st.root)
    for p in paths:
        status, _, body = _get(server, p)
        assert status == 200, (p, body[:300])
    assert files_state(st.root) == before
    assert _get(server, "/api/umap")[0] == 405  # computing is a POST, never a GET


def test_computing_is_an_explicit_post(server):
    """POST /api/umap finds the stored map for the same data and settings (cached); bad settings are 400."""
    body = {"extraction": server["eid"], "sample": 600, "pca": 20}
    status, _, out = _get(server, "/api/umap", method="POST", body=json.dumps(body), headers={"Content-Type": "application/json"})
    res = json.loads(out)
    assert status == 200 and res["cached"] and res["umap_id"] == server["umap"] and not res["stale"]
    for bad in ({**body, "sample": -1}, {**body, "pca": "x"}, {**body, "extraction": "../x"}, {"sample": 5}):
        status, _, out = _get(server, "/api/umap", method="POST", body=json.dumps(bad), headers={"Content-Type": "application/json"})
        assert status == 400 and json.loads(out)["error"], bad


@pytest.mark.parametrize("path", [
    "/api/neighbors?extraction={e}&slide=S02&tile=3&k=-1", "/api/neighbors?extraction={e}&slide=S02&tile=3&k=abc",
    "/api/neighbors?extraction={e}&slide=S02&tile=3&k=100000", "/api/neighbors?extraction={e}&slide=S02&tile=-5",
    "/api/neighbors?extraction={e}&slide=S02&tile=abc", "/api/neighbors?extraction={e}&slide=S02&tile=99999",
    "/api/neighbors?extraction={e}&slide=NOPE&tile=1", "/api/neighbors?extraction=eNOPE&slide=S02&tile=1",
    "/api/neighbors?extraction={e}&slide=S02&tile=1&exclude=everything", "/api/neighbors?slide=S02&tile=1",
    "/api/umap/{u}/values?value=nope", "/api/umap/{u}/values?value=SELECT%20nope%20FROM",
    "/api/umap/{u}/values", "/api/umap/u..bad", "/api/umap/uNOPE/points.bin",
    "/api/overlay?extraction={e}&slide=S02&value=model:mNOPE:x", "/api/overlay?slide=S02&value=sharpness",
    "/api/tile/{e}/S02/3.png?size=99999", "/api/tile/{e}/S02/3.png?size=-1", "/api/tile/{e}/S02/abc.png",
    "/api/tile/{e}/NOPE/3.png", "/dz/NOPE.dzi", "/dz/S02_files/99/0_0.jpeg", "/dz/S02_files/0/5_5.jpeg",
    "/dz/S02_files/x/0_0.jpeg", "/api/values?extraction=eNOPE", "/api/values",
])
def test_bad_parameters_are_400_json(server, path):
    status, ctype, body = _get(server, path.format(e=server["eid"], u=server["umap"]))
    assert status == 400 and "application/json" in ctype, (path, status, body[:200])
    assert json.loads(body)["error"]


def test_no_path_outside_catalogued_slides_and_tiles(server):
    """The catalog (clinical data) and the store's files are unreachable by any route or traversal."""
    magic = server["store"].catalog_path.read_bytes()[8:12]  # "DUCK"
    for p in ("/files/catalog.duckdb", "/catalog.duckdb", "/static/../catalog.duckdb", "/static/%2e%2e/%2e%2e/catalog.duckdb",
              "/static/..%2f..%2fserver.py", "/dz/..%2Fcatalog.dzi", "/dz/%2e%2e/catalog.duckdb",
              f"/api/tile/{server['eid']}/..%2F..%2Fcatalog/1.png", "/static//etc/passwd", "/static/../../../../etc/passwd",
              "/api/umap/u..%2F..%2Fcatalog", "/api/umap/..%2F..%2Fcatalog.duckdb/points.bin"):
        status, ctype, body = _get(server, p)
        assert status in (400, 403, 404) and magic not in body and b"root:" not in body, (p, status)
        assert "json" in ctype, p


def test_sql_from_the_page_cannot_write(server):
    st = server["store"]
    target = st.root / "x.csv"
    q = urllib.parse.quote(f"COPY (SELECT 1 AS color) TO '{target}' (FORMAT csv)")
    status, _, body = _get(server, f"/api/umap/{server['umap']}/values?value={q}")
    assert status == 400 and not target.exists()


# ---- page in headless Chromium -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    sync = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium not installed (apt-get install chromium)")
    with sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    d = tmp_path_factory.mktemp("explorer-screenshots")
    print(f"\nexplorer screenshots: {d}")
    return d


@pytest.fixture()
def page(browser, server):
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server["base"], wait_until="domcontentloaded")
    pg.wait_for_function("document.body.dataset.ready && document.getElementById('scatter').dataset.rendered > 0",
                         timeout=120_000)
    yield pg
    pg.close()
    assert not errors, errors


def _png(pg, selector, path) -> np.ndarray:
    pg.locator(selector).screenshot(path=str(path))
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def _osd_ready(pg):
    pg.wait_for_function("window.__explorer.viewer.world.getItemCount() > 0 && "
                         "window.__explorer.viewer.world.getItemAt(0).getFullyLoaded()", timeout=60_000)


def test_slide_overlay_colour_by_clinical_and_switching(page, server, shots):
    """Open a slide, overlay a model's predictions, colour the UMAP by a clinical column; switching extraction clears."""
    pg = page
    pg.select_option("#slide", "S03")
    pg.wait_for_function("window.__explorer.opened === 'S03'", timeout=60_000)
    _osd_ready(pg)
    plain = _png(pg, "#viewer", shots / "slide.png")
    assert plain.std() > 10  # real H&E pixels from the deep-zoom tiles
    options = pg.eval_on_selector_all("#overlayBy option", "os => os.map(o => o.value)")
    assert f"umap:{server['umap']}:cluster" in options and "sharpness" in options and "clinical.er_status" in options
    spec = f"model:{server['model']}:{server['gene']}"
    pg.select_option("#overlayBy", spec)
    pg.wait_for_function(f"document.getElementById('viewer').dataset.overlay === {json.dumps(spec)}", timeout=60_000)
    legend = pg.inner_text("#slideLegend")
    assert server["gene"] in legend and "predicted" in legend and "cohort" in legend
    pg.fill("#opacity", "1")
    pg.dispatch_event("#opacity", "input")
    pg.wait_for_timeout(500)
    over = _png(pg, "#viewer", shots / "slide_overlay.png")
    assert np.abs(over - plain).mean() > 8  # the overlay really paints the slide
    # hovering a tile names its value
    xy = pg.evaluate("""async () => { const S = window.__explorer, m = S.slideMeta['S03'], g = S.geoNow, v = S.viewer;
        const p = v.viewport.imageToViewerElementCoordinates(new OpenSeadragon.Point(g.x[0] - m.bounds.x0 + g.s[0] / 2,
            g.y[0] - m.bounds.y0 + g.s[0] / 2));
        const r = v.element.getBoundingClientRect(); return [r.left + p.x, r.top + p.y]; }""")
    pg.mouse.move(*xy)
    pg.wait_for_function("document.getElementById('slideHover').textContent.includes(':')", timeout=10_000)
    assert server["gene"] in pg.inner_text("#slideHover")
    before = _png(pg, "#scatterWrap", shots / "umap_plain.png")
    pg.select_option("#colorBy", "clinical.er_status")
    pg.wait_for_function("document.getElementById('legend').dataset.kind === 'categorical'", timeout=60_000)
    legend = pg.inner_text("#legend")
    counts = [int(c) for c in re.findall(r"\((\d+)\)", legend)]
    n = int(pg.evaluate("window.__explorer.n"))
    assert "er_status" in legend and sum(counts) == n and len(counts) >= 2
    pg.wait_for_timeout(500)
    img = _png(pg, "#scatterWrap", shots / "umap_er_status.png")
    blue = ((abs(img[..., 0] - 31) < 30) & (abs(img[..., 1] - 119) < 30) & (abs(img[..., 2] - 180) < 30)).sum()
    orange = ((abs(img[..., 0] - 255) < 30) & (abs(img[..., 1] - 127) < 30) & (abs(img[..., 2] - 14) < 40)).sum()
    assert blue > 200 and orange > 200 and np.abs(img - before).mean() > 1
    pg.click("#helpBtn")
    assert "Shift" in pg.inner_text("#help") and pg.is_visible("#help")
    pg.select_option("#colorBy", "sharpness")
    pg.wait_for_function("document.getElementById('legend').dataset.kind === 'continuous'", timeout=60_000)
    assert "Laplacian" in pg.inner_text("#legend")
    pg.select_option("#extraction", server["seid"])
    pg.wait_for_function(f"window.__explorer.eid === {json.dumps(server['seid'])} && window.__explorer.gen > 1", timeout=60_000)
    pg.wait_for_function("document.getElementById('status').textContent.includes('no UMAP')", timeout=60_000)
    assert pg.evaluate("window.__explorer.neighbours.length + window.__explorer.selection.length") == 0
    assert pg.inner_text("#legend") == "" and pg.inner_text("#neighbors") == ""


def test_lasso_then_click_a_neighbour_to_land_on_its_slide(page, server, shots):
    """Lasso a region and get its tiles (and see them on a slide); then click a point, then a neighbour."""
    pg = page
    L, T, W, H = pg.evaluate("() => { const b = document.getElementById('scatter').getBoundingClientRect(); "
                             "return [b.left, b.top, b.width, b.height]; }")
    poly = [(L + W * 0.15, T + H * 0.15), (L + W * 0.85, T + H * 0.15), (L + W * 0.85, T + H * 0.6),
            (L + W * 0.15, T + H * 0.6), (L + W * 0.15, T + H * 0.15)]
    pg.keyboard.down("Shift")
    pg.mouse.move(*poly[0])
    pg.mouse.down()
    for a, b in zip(poly, poly[1:], strict=False):
        for k in range(1, 13):
            pg.mouse.move(a[0] + (b[0] - a[0]) * k / 12, a[1] + (b[1] - a[1]) * k / 12)
    pg.mouse.up()
    pg.keyboard.up("Shift")
    pg.wait_for_function("window.__explorer.selection.length > 0", timeout=30_000)
    sel, pos = pg.evaluate("""() => { const S = window.__explorer, r = document.getElementById('scatter').getBoundingClientRect();
        const pos = []; for (let i = 0; i < S.n; i++) { const p = S.sp.getScreenPosition(i); pos.push([r.left + p[0], r.top + p[1]]); }
        return [S.selection, pos]; }""")
    pos = np.array(pos)
    inside = (pos[:, 0] > L + W * 0.15 + 3) & (pos[:, 0] < L + W * 0.85 - 3) & (pos[:, 1] > T + H * 0.15 + 3) & (pos[:, 1] < T + H * 0.6 - 3)
    chosen = np.zeros(len(pos), bool)
    chosen[sel] = True
    assert inside.sum() > 10 and chosen[inside].mean() > 0.97  # the points in the lassoed area are selected...
    border = (pos[:, 0] > L + W * 0.15 - 3) & (pos[:, 0] < L + W * 0.85 + 3) & (pos[:, 1] > T + H * 0.15 - 3) & (pos[:, 1] < T + H * 0.6 + 3)
    assert not (chosen & ~border).any()  # ...and nothing outside it
    info = pg.inner_text("#selInfo")
    assert info.startswith(f"{len(sel)} tiles")
    per_slide = sum(int(b.split(": ")[1]) for b in pg.locator("#selSlides button").all_inner_texts())
    assert per_slide == len(sel) or len(pg.locator("#selSlides button").all_inner_texts()) == 30
    pg.wait_for_function("[...document.querySelectorAll('#selection img')].every(i => i.complete && i.naturalWidth > 0)",
                         timeout=60_000)
    assert pg.locator("#selection .sel").count() == min(60, len(sel))
    pg.click("#showOnSlides")
    pg.wait_for_function("Number(document.getElementById('viewer').dataset.marks) > 0", timeout=60_000)
    first = pg.evaluate("window.__explorer.selectionBySlide[0]")
    assert pg.evaluate("window.__explorer.slide") == first[0]
    pg.screenshot(path=str(shots / "lasso.png"), full_page=True)
    pg.keyboard.press("Escape")
    i, xy = pg.evaluate("""() => { const S = window.__explorer, r = document.getElementById('scatter').getBoundingClientRect();
        for (let i = 0; i < S.n; i++) { const p = S.sp.getScreenPosition(i);
          if (p[0] > 20 && p[1] > 20 && p[0] < r.width - 20 && p[1] < r.height - 20) return [i, [r.left + p[0], r.top + p[1]]]; } }""")
    sid, tile = pg.evaluate(f"[window.__explorer.slides[window.__explorer.sidx[{i}]], window.__explorer.tile[{i}]]")
    pg.mouse.move(*xy)
    pg.wait_for_function("!document.getElementById('hover').hidden", timeout=10_000)
    pg.wait_for_function("document.getElementById('hoverText').textContent.includes('patient')", timeout=30_000)
    hover = pg.inner_text("#hoverText")
    assert "site" in hover and "QC" in hover
    pg.mouse.click(*xy)
    pg.wait_for_selector("#neighbors .nb", timeout=60_000)
    q = pg.evaluate("window.__explorer.query")
    rows = pg.evaluate("window.__explorer.neighbours")
    assert len(rows) == 12 and not any(r["slide_id"] == q["slide"] and r["tile_id"] == q["tile"] for r in rows)
    text = pg.inner_text("#neighbors")
    assert "d = 0.000" not in text and "1 - cosine" in text
    _, _, body = _get(server, f"/api/neighbors?extraction={server['eid']}&slide={q['slide']}&tile={q['tile']}&k=12")
    assert [(r["slide_id"], r["tile_id"]) for r in json.loads(body)["rows"]] == [(r["slide_id"], r["tile_id"]) for r in rows]
    pg.select_option("#exclude", "slide")
    pg.wait_for_function(f"window.__explorer.neighbours.every(r => r.slide_id !== {json.dumps(q['slide'])})", timeout=60_000)
    target = pg.evaluate("window.__explorer.neighbours[0]")
    pg.locator("#neighbors .nb").first.click()
    pg.wait_for_function(f"window.__explorer.opened === {json.dumps(target['slide_id'])}", timeout=60_000)
    _osd_ready(pg)
    pg.wait_for_function("window.__explorer.focus !== null && window.__explorer.focus !== undefined", timeout=30_000)
    assert pg.input_value("#slide") == target["slide_id"]
    assert pg.evaluate("window.__explorer.focus") == [target["slide_id"], target["tile_id"]]
    # the viewport is centred on the neighbour tile
    dx = pg.evaluate("""() => { const S = window.__explorer, m = S.slideMeta[S.slide], g = S.geoNow, k = g.pos.get(S.focus[1]);
        const c = S.viewer.viewport.getCenter(true), bw = m.bounds.width;
        return Math.hypot(c.x - (g.x[k] - m.bounds.x0 + g.s[k] / 2) / bw, c.y - (g.y[k] - m.bounds.y0 + g.s[k] / 2) / bw) * bw / g.s[k]; }""")
    assert dx < 0.6
    pg.screenshot(path=str(shots / "neighbour_on_slide.png"), full_page=True)
    assert sid and tile is not None


def test_million_point_scatter_renders(browser, tmp_path, shots):
    """A 1,000,000-point map draws (WebGL via the vendored regl-scatterplot); paint time is in benchmarks/."""
    import pandas as pd
    from waitress.server import create_server

    from hefeat.explore.server import create_app
    from hefeat.explore.umap_map import write_umap
    from hefeat.store.atomic import write_json
    from hefeat.store.catalog import Store

    st = Store.init(tmp_path / "big")
    write_json(st.extraction_dir("ebig") / "_extraction.json", {"extraction_id": "ebig", "tiling_id": "tbig", "dim": 8,
                                                                 "encoder": "synthetic", "created": "now"})
    rng = np.random.default_rng(0)
    n = 1_000_000
    xy = rng.normal(size=(n, 2)) + rng.integers(0, 6, (n, 1)) * 4
    rows = pd.DataFrame({"slide_id": np.char.add("S", (np.arange(n) // 10_000).astype(str)), "tile_id": np.arange(n) % 10_000,
                         "umap_x": xy[:, 0].astype(np.float32), "umap_y": xy[:, 1].astype(np.float32),
                         "cluster": np.zeros(n, np.int16)})
    write_umap(st, "ubig", rows, {"umap_id": "ubig", "extraction_id": "ebig", "n": n, "n_slides": 100, "tiling_id": "tbig"})
    srv = create_server(create_app(st), host="127.0.0.1", port=0, threads=2)
    threading.Thread(target=srv.run, daemon=True).start()
    try:
        pg = browser.new_page(viewport={"width": 1200, "height": 900})
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(f"http://127.0.0.1:{srv.effective_port}/", wait_until="domcontentloaded")
        pg.wait_for_function("document.getElementById('scatter').dataset.rendered === '1000000'", timeout=90_000)
        pg.wait_for_timeout(300)
        img = _png(pg, "#scatterWrap", shots / "million.png")
        assert not errors, errors
        assert ((img.sum(-1) < 600).mean()) > 0.05  # dark points cover a good part of the canvas
        assert pg.evaluate("window.__explorer.firstPaintMs") > 0
        pg.close()
    finally:
        srv.close()
