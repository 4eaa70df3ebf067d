"""A process started for one command ends without the interpreter's teardown (hefeat.cli.common.exit_now),
but with its output, exit code, atexit handlers and other threads' work intact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The console script's way in (main() reads sys.argv), with two witnesses: an atexit handler (must run) and an
# object finalised only when the interpreter tears its modules down (runs only on the normal exit).
SCRIPT = textwrap.dedent("""
    import atexit, sys, threading
    atexit.register(lambda: (sys.stderr.write("ATEXIT\\n"), sys.stdout.write("\\tAFTER")))  # AFTER: left buffered

    class Teardown:
        def __del__(self):
            sys.stderr.write("TEARDOWN\\n")

    WITNESS = Teardown()
    sys.stdout.write("BEFORE\t")
    if sys.argv[1] == "thread":  # a non-daemon thread whose work the process must wait for: it is still waiting
        # when the command ends, however long that takes, and is released by the interpreter's shutdown itself
        # (threading's own pre-join hook), so only an exit that waits for threads lets it write
        release = threading.Event()
        threading._register_atexit(release.set)
        threading.Thread(target=lambda: (release.wait(), sys.stderr.write("THREAD DONE\\n"))).start()
    sys.argv = ["hefeat", *sys.argv[2:]]
    from hefeat.cli import main
    main(prog_name="hefeat")
""")


def _run(tmp_path, *args, thread=False, env=None):
    e = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    e.pop("PYTHONUNBUFFERED", None)  # a piped stdout block-buffered, as a user's is
    return subprocess.run([sys.executable, "-c", SCRIPT, "thread" if thread else "-", *args], capture_output=True,
                          text=True, env=e, cwd=tmp_path, timeout=120)


def test_a_command_ends_without_teardown_keeping_output_and_atexit(tmp_path):
    p = _run(tmp_path, "init", "--store", str(tmp_path / "s"), "--json")
    assert p.returncode == 0, p.stderr
    before, out, after = p.stdout.split("\t")
    assert before == "BEFORE" and json.loads(out) == {"store": str(tmp_path / "s")} and after == "AFTER"
    from hefeat.store.catalog import Store

    assert Store(tmp_path / "s").sql("SELECT count(*) AS n FROM slides")["n"].tolist() == [0]  # the catalog opens
    assert "ATEXIT" in p.stderr and "TEARDOWN" not in p.stderr


def test_the_normal_exit_is_one_switch_away(tmp_path):
    """HEFEAT_FAST_EXIT=0: the same command tears down as Python does (the witness shows the test can see it)."""
    p = _run(tmp_path, "init", "--store", str(tmp_path / "s"), "--json", env={"HEFEAT_FAST_EXIT": "0"})
    assert p.returncode == 0, p.stderr
    assert "ATEXIT" in p.stderr and "TEARDOWN" in p.stderr


def test_a_failing_command_keeps_its_code_and_message(tmp_path):
    p = _run(tmp_path, "extract", "--store", str(tmp_path / "missing"), "--encoder", "resnet18", "--weights", "none")
    assert p.returncode == 1
    assert "Error:" in p.stderr and "ATEXIT" in p.stderr and "TEARDOWN" not in p.stderr


@pytest.mark.parametrize("fast", ["1", "0"])
def test_a_running_thread_is_waited_for(tmp_path, fast):
    p = _run(tmp_path, "init", "--store", str(tmp_path / "s"), "--json", thread=True, env={"HEFEAT_FAST_EXIT": fast})
    assert p.returncode == 0, p.stderr
    assert "THREAD DONE" in p.stderr and "TEARDOWN" in p.stderr  # the normal exit, which waits for the thread
