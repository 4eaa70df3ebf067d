"""Store file names live in hefeat/store/layout.py only: an AST scan for name literals anywhere else."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import hefeat

PKG = Path(hefeat.__file__).resolve().parent
_EXT = r"(json|parquet|h5|npz|npy|pt|safetensors|csv|tsv|faiss|png)"
FILE_NAME = re.compile(rf"^[\w.*{{}}/-]*\.{_EXT}$")  # 'model.json', '*.h5', '.parquet' (an f-string's tail)
KEYED_FOLDER = re.compile(r"^[a-z_]+=[\w.*{}-]*$")  # 'fold=', 'slide=' (an f-string's head), 'model=abc'

# Names that are not in a store, each with why.
ALLOWED = {
    ("extract/encoders.py", "model.safetensors"): "a hub repository's weight file, not a store file",
    ("extract/interop.py", "*.h5"): "the user's CLAM/TRIDENT folder being imported",
    ("extract/interop.py", ".h5"): "the CLAM/TRIDENT folder features are exported to",
    ("extract/encoders.py", ".safetensors"): "the suffix of a user's weights file",
    ("extract/encoders.py", ".pt"): "the suffix of a user's weights file",
    ("cli/store_cmds.py", ".parquet"): "the suffix of the user's --out file",
    ("learn/traits.py", ".parquet"): "the suffix of the user's --out file",
    ("extract/precision.py", "precision.json"): "the per-user measurement cache, not a store",
    ("demo.py", "truth.json"): "the synthetic cohort's folder (slides/synth)",
    ("demo.py", "expression.parquet"): "the synthetic cohort's folder",
    ("demo.py", "spots.parquet"): "the synthetic cohort's folder",
    ("demo_stages.py", "truth.json"): "the synthetic cohort's folder",
    ("demo_stages.py", "spots.parquet"): "the synthetic cohort's folder",
    ("slides/synth.py", "truth.json"): "the synthetic cohort's folder",
    ("slides/synth.py", "expression.parquet"): "the synthetic cohort's folder",
    ("slides/synth.py", "spots.parquet"): "the synthetic cohort's folder",
    ("slides/synth.py", ".classes.npz"): "the synthetic cohort's folder",
    ("slides/synth.py", "clinical.csv"): "the synthetic cohort's folder",
    ("slides/synth.py", "manifest.csv"): "the synthetic cohort's folder",
    ("demo.py", "clinical.csv"): "the synthetic cohort's folder",
    ("demo_stages.py", "spot_regions.csv"): "the demo's region labels, written to its --out folder",
    ("extract/interop.py", "manifest.csv"): "the CLAM/TRIDENT folder features are exported to",
    ("cli/explore_cmds.py", ".png"): "`hefeat tiles show`'s default --out, in the working folder",
    ("slides/reader.py", ".png"): "the suffix of a user's plain-image slide file",
}


def store_literals(pkg: Path) -> list[tuple[str, int, str]]:
    """(module, line, literal) of every store-looking file or folder name outside pkg/store/ (docstrings skipped)."""
    found = []
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg).as_posix()
        if rel.startswith(("store/", "formats/")):  # formats/ reads published layouts (Visium, HEST ...), not stores
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for n in ast.walk(tree):
            if not (isinstance(n, ast.Constant) and isinstance(n.value, str)) or id(n) in docs:
                continue
            if (FILE_NAME.match(n.value) or KEYED_FOLDER.match(n.value)) and (rel, n.value) not in ALLOWED:
                found.append((rel, n.lineno, n.value))
    return found


def test_no_store_file_name_outside_store():
    """Every model, prediction, job, index and stage file name comes from hefeat.store.layout."""
    assert store_literals(PKG) == []


def test_scan_catches_a_planted_literal(tmp_path):
    """The scan fails on names planted outside store/ (plain, f-string head and tail) and not inside it."""
    (tmp_path / "learn").mkdir()
    (tmp_path / "store").mkdir()
    (tmp_path / "learn" / "planted.py").write_text(
        '"""Docstrings may say model.json."""\n'
        "def f(d, k, sid):\n"
        "    a = d / 'model.json'\n"
        "    b = d / f'fold={k}' / 'best.pt'\n"
        "    return a, b, d / f'{sid}.h5', 'a sentence naming x.json is prose'\n"
        "def g(d):\n"
        "    return d / 'baseline_features.npy', d / 'metrics.csv', d / 'genes.tsv', d / 'index.faiss'\n"
        "def h(out, sid):\n"
        "    return out / 'roc.png', out / f'cartography_{sid}.png'\n")
    (tmp_path / "store" / "layout.py").write_text("MODEL_META = 'model.json'\n")
    found = store_literals(tmp_path)
    assert sorted(found) == [("learn/planted.py", 3, "model.json"), ("learn/planted.py", 4, "best.pt"),
                             ("learn/planted.py", 4, "fold="), ("learn/planted.py", 5, ".h5"),
                             ("learn/planted.py", 7, "baseline_features.npy"), ("learn/planted.py", 7, "genes.tsv"),
                             ("learn/planted.py", 7, "index.faiss"), ("learn/planted.py", 7, "metrics.csv"),
                             ("learn/planted.py", 9, ".png"), ("learn/planted.py", 9, "roc.png")]


def test_allow_list_is_current():
    """Every allowed name still occurs where it is allowed (a stale entry would hide a new literal)."""
    for rel, name in ALLOWED:
        assert repr(name)[1:-1] in (PKG / rel).read_text(), (rel, name)


RECORD_NAMES = {"JOB_META", "JOB_INDEX", "job_meta_path", "job_index_path", "MODEL_META", "MODEL_INDEX",
                "MODEL_ARRAYS", "model_index_path"}


def record_name_uses(pkg: Path) -> list[tuple[str, int, str]]:
    """(module, line, name) of every use of a model's or a job's record names (layout.MODEL_META, job_meta_path, ...)
    outside pkg/store/: those records are saved, loaded and checked by hefeat.store.models and hefeat.store.jobs."""
    found = []
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg).as_posix()
        if rel.startswith("store/"):
            continue
        for n in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            name = n.attr if isinstance(n, ast.Attribute) else n.id if isinstance(n, ast.Name) else None
            if name in RECORD_NAMES:
                found.append((rel, n.lineno, name))
    return found


def test_model_and_job_records_go_through_the_store():
    """No module outside store/ reads or writes a model's or a job's record files itself; a planted use is found."""
    assert record_name_uses(PKG) == []


def test_record_scan_catches_a_planted_use(tmp_path):
    """The record scan reports exactly the names planted outside store/."""
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "planted.py").write_text(
        "from hefeat.store import layout\n"
        "def f(root, jid, jdir):\n"
        "    return layout.job_meta_path(root, jid), jdir / layout.JOB_INDEX\n")
    assert record_name_uses(tmp_path) == [("finetune/planted.py", 3, "job_meta_path"),
                                          ("finetune/planted.py", 3, "JOB_INDEX")]


# Modules outside store/ids.py that hash, each with what it hashes: content fingerprints that go into ids
# (ids.py mints the ids from them), never an id itself.
HASHING = {
    "extract/interop.py": "the imported CLAM/TRIDENT folder's coords and features (ids.imported_* take the digests)",
    "extract/precision.py": "the key of the per-user measurement cache (not a store id)",
    "extract/encoders.py": "an encoder's weights digest (part of an extraction's provenance and id inputs)",
    "finetune/job.py": "a job's data fingerprints (ids.finetune_job_id takes them)",
    "finetune/train.py": "a network's weights digest (every DDP rank must agree; recorded per fold)",
    "formats/synth_layouts.py": "deterministic seeds and fake checksums of synthetic published layouts",
    "formats/gdc.py": "the md5 a GDC manifest lists for each file (checked on read)",
    "slides/stain.py": "a stain reference's fingerprint (an extraction's id input)",
    "learn/emo.py": "the hold-out file's content (a model's id input)",
    "learn/spots.py": "the region-label file's content (a model's id input)",
}


def hashing_modules(pkg: Path) -> list[str]:
    """Modules outside store/ that import hashlib (where an id formula other than hefeat.store.ids' would hide)."""
    found = []
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg).as_posix()
        tree = ast.parse(path.read_text(), filename=str(path))
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        if "hashlib" in names and not rel.startswith("store/"):
            found.append(rel)
    return found


def test_ids_are_minted_in_store_ids_only():
    """Every module outside store/ that hashes is listed with what it hashes (fingerprints, not ids), and
    every listed one still hashes; a planted hashing module is found."""
    assert sorted(hashing_modules(PKG)) == sorted(HASHING)


def test_hashing_scan_catches_a_planted_module(tmp_path):
    (tmp_path / "learn").mkdir()
    (tmp_path / "learn" / "planted.py").write_text("from hashlib import sha256\n\ndef my_id(p):\n"
                                                   "    return sha256(repr(p).encode()).hexdigest()[:12]\n")
    assert hashing_modules(tmp_path) == ["learn/planted.py"]
