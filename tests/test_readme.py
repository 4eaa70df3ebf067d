"""The README's command lines: every one names a real command and real options, and the cheap ones run as written."""

from __future__ import annotations

import glob
import json
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from hefeat.cli import main

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """`hefeat ...` lines of the README's bash blocks, comments stripped (torchrun's `-m hefeat.cli` too)."""
    out, inside = [], False
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            inside = not inside and line.strip() == "```bash"
            continue
        cmd = line.split(" # ")[0].split("  #")[0].strip()
        if inside and "-m hefeat.cli " in cmd:
            cmd = "hefeat " + cmd.split("-m hefeat.cli ", 1)[1]
        if inside and cmd.startswith("hefeat "):
            out.append(cmd)
    return out


def _resolve(args: list[str]) -> tuple[click.Command, list[str]]:
    cmd, ctx = main, click.Context(main)
    while isinstance(cmd, click.Group) and args and (sub := cmd.get_command(ctx, args[0])) is not None:
        cmd, ctx, args = sub, click.Context(sub, parent=ctx), args[1:]
    return cmd, args


def test_readme_lists_the_commands():
    cmds = readme_commands()
    assert len(cmds) > 60 and any(c.startswith("hefeat extract") for c in cmds)


@pytest.mark.parametrize("line", readme_commands())
def test_readme_command_line_names_real_options(line):
    """Each README line's command exists and takes every option the line uses (no drift from the CLI)."""
    cmd, rest = _resolve(shlex.split(line)[1:])
    assert cmd is not main, f"{line}: no such command"
    known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"-h", "--help"}
    for tok in rest:
        tok = tok.strip("[]")
        if tok.startswith("-") and not tok.lstrip("-").replace(".", "").isdigit() and tok not in ("-", "--"):
            assert tok.split("=")[0] in known, f"{line}: `{cmd.name}` has no option {tok.split('=')[0]}"


def _run(args: list[str]) -> dict:
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.JSONDecoder().raw_decode(r.output[r.output.index("{"):])[0]


def test_cheap_readme_commands_run_as_written(tmp_path, cohort, monkeypatch):
    """The README's CMU ingest and EfficientNet-Lite0 extraction run on a demo-like store (112 px tiles at
    1 µm/px) exactly as written (the old lines: a CMU path that does not exist, 112 px tiles refused)."""
    from hefeat.demo import DEMO_TILES
    from hefeat.slides.run import ingest_slides, run_tiling
    from hefeat.slides.tiling import TilingParams
    from hefeat.store.catalog import Store

    cmds = readme_commands()
    monkeypatch.chdir(ROOT)  # README paths are relative to the repository
    st = Store.init(tmp_path / "st")
    store = ["--store", str(st.root), "--json"]
    cmu = next(c for c in cmds if "CMU-1-Small-Region.svs" in c)
    assert _run([*shlex.split(cmu)[1:], *store])["added"] == 1
    ingest_slides(st, sorted(glob.glob(str(cohort / "slides" / "*.tiff")))[:1])
    run_tiling(st, TilingParams(**DEMO_TILES, max_tiles=6), slides=["S01"])
    lite = next(c for c in cmds if c.startswith("hefeat extract --encoder efficientnet-lite0"))
    s = _run([*shlex.split(lite)[1:], "--slides", "S01", "--workers", "0", "--precision", "fp32", *store])
    assert s["ok"] == 1 and s["encoder"] == "efficientnet-lite0"


def test_finetune_hints_name_what_a_recipe_sets():
    """An encoder error inside `finetune run` names recipe values, not `hefeat extract` options it lacks."""
    from hefeat.finetune.train import recipe_hint

    msg = recipe_hint("Could not get pretrained weights for densenet121 (offline). Pass --weights path/to/f.safetensors, "
                      "or --weights none for random init, or use --encoder efficientnet-lite0 (ImageNet weights).")
    assert "--weights" not in msg and "--encoder" not in msg
    assert "--set weights=path/to/f.safetensors" in msg and "--set weights=none" in msg
    assert "--set backbone=efficientnet-lite0" in msg
