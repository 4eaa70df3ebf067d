"""The explorer page end to end in headless Chromium: loads, scatter renders, a click lists neighbours."""

from __future__ import annotations

import shutil
import socket
import threading
import urllib.error
import urllib.request

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(learned):
    from werkzeug.serving import make_server

    from hefeat.explore.server import create_app

    st, eid, _, _ = learned
    port = _free_port()
    srv = make_server("127.0.0.1", port, create_app(st), threaded=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{port}", st, eid
    srv.shutdown()


def test_path_traversal_is_refused(server):
    base, st, _ = server
    with urllib.request.urlopen(f"{base}/files/catalog.duckdb") as r:  # inside the store: served
        assert r.status == 200
    for bad in ("/files/../../etc/passwd", "/files/%2e%2e/%2e%2e/etc/passwd", "/files//etc/passwd"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + bad)
        assert e.value.code in (400, 403, 404)


def test_page_renders_scatter_and_click_lists_neighbours(server, tmp_path):
    sync = pytest.importorskip("playwright.sync_api")
    if not shutil.which("chromium") and not __import__("os").path.exists(CHROMIUM):
        pytest.skip("chromium not installed")
    base, st, eid = server
    with sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.goto(base, wait_until="domcontentloaded")
        page.wait_for_function("document.getElementById('plot').dataset.rendered > 0", timeout=120_000)
        n = int(page.eval_on_selector("#plot", "c => c.dataset.rendered"))
        assert n > 100
        # The canvas really has coloured pixels.
        painted = page.evaluate("""() => { const c = document.getElementById('plot');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let k = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) k++; return k; }""")
        assert painted > 400
        # Click on a drawn point: find one in page coordinates.
        xy = page.evaluate("""() => { const p = points[0]; const r = document.getElementById('plot').getBoundingClientRect();
            return [r.left + scaleX(p.umap_x), r.top + scaleY(p.umap_y)]; }""")
        page.mouse.move(*xy)
        page.wait_for_selector("#hover img[src*='/api/tile/']", state="visible", timeout=30_000)
        page.mouse.click(*xy)
        page.wait_for_selector("#neighbors .nb img", timeout=60_000)
        assert page.locator("#neighbors .nb").count() == 12
        page.wait_for_function("[...document.querySelectorAll('#neighbors img')].every(i => i.complete && i.naturalWidth > 0)",
                               timeout=60_000)
        page.click("#showHeat")
        page.wait_for_function("document.getElementById('heat').naturalWidth > 0", timeout=60_000)
        page.screenshot(path=str(tmp_path / "explorer.png"))
        browser.close()
