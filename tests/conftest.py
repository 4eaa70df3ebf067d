"""Shared fixtures: a small synthetic cohort and a tiled store built once per session."""

from __future__ import annotations

import glob
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# Precision calibrations cached per test session, never in the user's ~/.cache. The process that makes the folder
# (the xdist controller: its workers inherit the variable) removes it when it exits.
if "HEFEAT_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["HEFEAT_CACHE_DIR"] = tempfile.mkdtemp(prefix="hefeat-test-cache-")
    atexit.register(shutil.rmtree, os.environ["HEFEAT_CACHE_DIR"], True)

import pytest  # noqa: E402

DATA = Path(__file__).parent / "data"
CMU = DATA / "CMU-1-Small-Region.svs"


# Under pytest-xdist (`-n 2 --dist loadgroup`, the README's test command) a unit of work is a test file, except that
# every test using the 40-slide `learned_base` store goes to one worker: it is built once per worker (~50 s). Each worker's
# pytest_collection_modifyitems writes {nodeid: group} to a folder the controller names (workerinput); the
# controller's scheduler reads it. (xdist's own loadgroup marks no longer reach the scheduler with pytest >= 9.2:
# pytest-dev/pytest-xdist#1386.)
_XDIST_GROUPS: list[Path] = []  # the controller's folder for the workers' {nodeid: group} files


def _xdist_group(item) -> str:
    mark = item.get_closest_marker("xdist_group")
    if mark is not None:
        return str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
    return "learned" if "learned_base" in item.fixturenames else item.nodeid.split("::")[0]


def pytest_collection_modifyitems(config, items):
    folder = getattr(config, "workerinput", {}).get("hefeat_xdist_groups")
    if folder:
        import json

        path = Path(folder) / f"{config.workerinput['workerid']}.json"
        path.with_suffix(".tmp").write_text(json.dumps({i.nodeid: _xdist_group(i) for i in items}))
        path.with_suffix(".tmp").replace(path)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    if not _XDIST_GROUPS:
        import tempfile

        _XDIST_GROUPS.append(Path(tempfile.mkdtemp(prefix="hefeat-xdist-groups-")))
    node.workerinput["hefeat_xdist_groups"] = str(_XDIST_GROUPS[0])


def pytest_unconfigure(config):
    if _XDIST_GROUPS:
        import shutil

        shutil.rmtree(_XDIST_GROUPS.pop(), ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadgroup" or not _XDIST_GROUPS:
        return None
    import json

    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        """Load scheduling by the groups the workers wrote (all workers collect the same tests)."""

        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:
                self.groups = {}
                for p in sorted(_XDIST_GROUPS[0].glob("*.json")):
                    self.groups.update(json.loads(p.read_text()))
            return self.groups.get(nodeid) or nodeid.split("::")[0]

    return ByGroup(config, log)


@pytest.fixture(scope="session")
def cmu_svs() -> Path:
    """OpenSlide's CMU-1-Small-Region.svs (real Aperio H&E, CC0)."""
    assert CMU.exists(), f"missing test slide {CMU}"
    return CMU


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """An 8-slide synthetic cohort (one slide at 0.25 µm/px, three with spots)."""
    from hefeat.slides.synth import make_cohort

    out = tmp_path_factory.mktemp("cohort")
    make_cohort(out, n_slides=8, n_genes=60, seed=1, width_um=1200, height_um=900)
    return out


def build_store(root: Path, cohort: Path, *, spots: bool = True):
    """Init, ingest the cohort and tile it (default + spot tilings)."""
    from hefeat.slides.run import ingest_slides, run_tiling
    from hefeat.slides.tiling import TilingParams
    from hefeat.store.catalog import Store
    from hefeat.store.ingest import ingest_clinical, ingest_expression, ingest_spots

    st = Store.init(root)
    ingest_slides(st, sorted(glob.glob(str(cohort / "slides" / "*.tiff"))))
    ingest_clinical(st, cohort / "clinical.csv")
    ingest_expression(st, cohort / "expression.parquet")
    ingest_spots(st, cohort / "spots.parquet")
    t = run_tiling(st, TilingParams())
    s = run_tiling(st, TilingParams(spots=True)) if spots else None
    return st, t.extra["tiling_id"], (s.extra["tiling_id"] if s else None)


@pytest.fixture(scope="session")
def tiled(tmp_path_factory, cohort):
    """(store, tiling_id, spot_tiling_id) over the session cohort. Treat as read-only."""
    return build_store(tmp_path_factory.mktemp("store"), cohort)


@pytest.fixture(scope="session")
def cohort40(tmp_path_factory) -> Path:
    """A 40-slide cohort (small slides) for the statistical tests: signal/null genes, spots, survival, labels."""
    from hefeat.slides.synth import make_cohort

    out = tmp_path_factory.mktemp("cohort40")
    make_cohort(out, n_slides=40, n_genes=80, seed=7, width_um=1000, height_um=750)
    return out


def cpu_runs_bf16() -> bool:
    """Whether this CPU runs bf16 (oneDNN bf16 kernels: AVX-512 BF16/AMX or emulated on AVX-512); an AVX2-only CPU
    does not, and hefeat refuses an explicit bf16 request there (it would run ~20x slower than fp32)."""
    from hefeat.extract.precision import device_capabilities

    return device_capabilities("cpu")["bf16"] != "no"


def fast_precision() -> str:
    """The precision test stores extract at: bf16 where the CPU runs it (faster there), else fp32."""
    return "bf16" if cpu_runs_bf16() else "fp32"


@pytest.fixture(scope="session")
def learned_base(tmp_path_factory, cohort40):
    """(store, extraction_id, spot_extraction_id, truth path) over cohort40, features from a truncated ResNet-18.

    Built once per session and never written after: a test that writes (models, indexes, UMAPs) takes `learned`,
    its own copy, so no test sees another's results (or passes only because another ran first)."""
    from hefeat.extract.pipeline import run_extraction

    st, tid, stid = build_store(tmp_path_factory.mktemp("store40"), cohort40)
    enc = dict(encoder="resnet18", layer="layer2", weights="none", precision=fast_precision())
    eid = run_extraction(st, tiling_id=tid, **enc).extra["extraction_id"]
    seid = run_extraction(st, tiling_id=stid, **enc).extra["extraction_id"]
    return st, eid, seid, cohort40 / "truth.json"


def copy_store(src, dest: Path, *, ignore=()):
    """A Store at `dest` holding a copy of `src`'s files (`ignore`: top-level folders left out)."""
    import shutil

    from hefeat.store.catalog import Store

    shutil.copytree(src.root, dest, ignore=shutil.ignore_patterns(*ignore) if ignore else None)
    return Store(dest)


@pytest.fixture
def learned(learned_base, tmp_path):
    """This test's own copy of `learned_base`: (store, extraction_id, spot_extraction_id, truth path)."""
    st0, eid, seid, truth = learned_base
    return copy_store(st0, tmp_path / "store40"), eid, seid, truth


def _store_files(root) -> dict[str, tuple[int, int]]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            s = os.stat(p)
            out[os.path.relpath(p, root)] = (s.st_size, s.st_mtime_ns)
    return out


@pytest.fixture
def files_state():
    """A function: every file under a folder with its size and mtime (to prove a read wrote nothing)."""
    return _store_files


class ForkedCommit(BaseException):
    """Stops the test process's own run once every child has crashed in its commit (it writes nothing itself)."""


def _crash_children(fn, owner, name: str, faults_to_try, check, *, before=None) -> None:
    """Run fn() once up to its call of `owner.<name>` (where a commit starts, after the deterministic work:
    training, fitting); there, for each (fault point spec 'name@nth', action 'kill' | 'enospc'), fork a child
    that runs the rest of fn() from that call (after `before()`, what a re-run does first) with that fault armed,
    and call check(spec, action, exit code) in this process once the child is gone: -9 for a child killed at its
    point, 3 for one out of disk there (ENOSPC raised out of fn), 4 for another error, 0 when it finished.
    Then this process stops its own run (ForkedCommit): each crash costs one commit, not one more fit."""
    import errno

    from hefeat.store import faults

    real, parent = getattr(owner, name), os.getpid()

    def at_commit(*args, **kwargs):
        for spec, action in faults_to_try:
            pid = os.fork()
            if pid == 0:  # the child: the rest of fn() from here, with the fault armed
                if before is not None:
                    before()
                point, _, nth = spec.partition("@")
                faults.disarm()
                faults.arm(point, action, int(nth or 1))
                return real(*args, **kwargs)
            _, status = os.waitpid(pid, 0)
            check(spec, action, os.waitstatus_to_exitcode(status))
        raise ForkedCommit

    try:
        with pytest.MonkeyPatch.context() as m:
            m.setattr(owner, name, at_commit)
            fn()
    except ForkedCommit:
        assert os.getpid() == parent
        return
    except BaseException as e:
        if os.getpid() != parent:
            os._exit(3 if isinstance(e, OSError) and e.errno == errno.ENOSPC else 4)
        raise
    if os.getpid() != parent:
        os._exit(0)
    raise AssertionError(f"{owner.__name__}.{name} was never called: no commit to crash in")


@pytest.fixture
def crash_children():
    """_crash_children: crash a run's commit at each fault point in forked children, paying for the run once."""
    return _crash_children


#: How the code before records v3 named what it stored (frozen from git: learn/models.py model_id and
#: finetune/job.py job_id at 7bb85df^, predictions before their generations): model ids hashed the full package
#: version, job ids the recipe, precision and data with the major.minor version; a model's predictions were a
#: plain folder predictions/model=<id>/slide=<sid>.parquet and its slide_predictions table a plain file
#: models/<id>/slide_predictions.parquet; file names (model.json, index.json, arrays.npz, job.json, index.json,
#: fold=<name>/done.json) are unchanged.
PRE_V3 = {"model_code": "0.1.0", "job_code": "0.1", "job_prefix": "ft-"}


def as_pre_v3(root: Path, mid: str) -> str:
    """Rewrite model `mid` of the store at `root` (and its fine-tuning job, if it is one) as the code before
    records v3 left it (PRE_V3): its old id, plain predictions folder and table files. Returns the old id."""
    import json
    import shutil

    import pandas as pd

    from hefeat.store.ids import content_id

    models, preds = root / "models", root / "predictions"
    meta = json.loads((models / mid / "model.json").read_text())
    jdir = root / "jobs" / mid
    if jdir.exists():
        job = json.loads((jdir / "job.json").read_text())
        old = content_id({"recipe": job["recipe"], "precision": job["precision"], "data": job["data"],
                          "code": PRE_V3["job_code"]}, prefix=PRE_V3["job_prefix"])
    else:
        old = content_id({"kind": meta["kind"], "params": meta["params"], "inputs": meta["inputs"],
                          "code": PRE_V3["model_code"]}, prefix=mid[:-12])
    assert old != mid
    link = preds / f"model={mid}"
    gen = link.resolve()  # the current generation (a copied store holds a plain copy of it)
    plain = preds / f"model={old}"
    plain.mkdir(parents=True)
    (models / mid).rename(models / old)
    for p in sorted(gen.iterdir()):
        df = pd.read_parquet(p)
        for col in ("model_id", "job_id"):
            if col in df.columns:
                df[col] = df[col].replace(mid, old)
        if p.name.startswith("table="):  # the slide_predictions table, then a plain file of the model
            dest = models / old / f"{p.name[len('table='):]}"
            dest.unlink(missing_ok=True)  # the link into the generations
            df.to_parquet(dest)
        else:
            df.to_parquet(plain / p.name)
    if link.is_symlink():
        link.unlink()
    else:
        shutil.rmtree(link)
    shutil.rmtree(preds / ".generations" / mid, ignore_errors=True)
    if jdir.exists():
        jdir.rename(root / "jobs" / old)
    for folder in (models / old, root / "jobs" / old):
        for p in folder.rglob("*.json") if folder.exists() else ():
            p.write_text(p.read_text().replace(mid, old))
    shutil.rmtree(root / "status" / f"finetune={mid}", ignore_errors=True)  # folds had no commit records then
    shutil.rmtree(root / "compact", ignore_errors=True)  # the catalog's caches are rebuilt from the files
    return old
