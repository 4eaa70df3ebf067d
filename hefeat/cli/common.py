"""Shared pieces of the CLI: the root group, --store/--json options, summary rendering."""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import sys

import click

from hefeat.errors import HefeatError

STORE_HELP = "Store directory (default: $HEFEAT_STORE or stores/default)."


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """A Python warning as one line for a CLI user (not the source file and line it came from)."""
    return f"warning ({category.__name__}): {message}\n"


class HefeatGroup(click.Group):
    """Turns library errors into one-line click errors, in one place."""

    own_process = False  # set by `main` when this process was started for one command (see quiet_gc)

    def main(self, args=None, *rest, **kwargs):
        """The entry point; `args=None` (arguments from the command line: the `hefeat` script or
        `python -m hefeat.cli`) means this process runs just this command. Callers in a longer-lived
        process (click's CliRunner, tests) pass their arguments."""
        if args is None:
            HefeatGroup.own_process = True
            try:
                return super().main(args, *rest, **kwargs)
            except SystemExit as e:  # click ends every standalone run with sys.exit
                exit_now(e.code)
                raise
        return super().main(args, *rest, **kwargs)

    def invoke(self, ctx):
        import warnings

        warnings.formatwarning = _warning_line
        try:
            return super().invoke(ctx)
        except HefeatError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:  # a full or read-only disk, a vanished file: what and where, in one line
            if e.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.ENOENT, errno.EIO):
                raise
            where = f" ({e.filename})" if e.filename else ""
            hint = " Free space and run the command again; finished work is kept." if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            raise click.ClickException(f"{e.strerror or e}{where}.{hint}") from None


def exit_now(code) -> None:
    """End a process that ran one command without the interpreter's teardown, where nothing needs it.

    Tearing down an interpreter that imported torch (freeing every module's objects one by one, then
    libtorch's C++ destructors) costs ~0.3 s of every command that embeds or fits, after its work is
    done and its output printed. Everything the store needs is already on disk by then (each commit
    is fsynced and its files closed; DuckDB write connections close at the end of their block). So
    stdout and stderr are flushed, the atexit handlers run (logging, multiprocessing's children,
    temporary directories, coverage) and the process ends with `code`. It returns (and the normal exit
    follows) where that would lose something: a non-daemon thread still running (Python waits for
    it), a non-integer code (Python prints it), an active profiler or tracer (their
    report comes after the command returns), a stream that cannot be flushed, or HEFEAT_FAST_EXIT=0.
    """
    import atexit
    import os
    import threading

    if os.environ.get("HEFEAT_FAST_EXIT") == "0" or not (code is None or isinstance(code, int)):
        return
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    if others or sys.getprofile() is not None or sys.gettrace() is not None:
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe (hefeat ... | head): Python's own exit reports it
        return
    atexit._run_exitfuncs()
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code or 0)


def store_option(f):
    """--store PATH on every command."""
    return click.option("--store", "store_path", default=None, envvar="HEFEAT_STORE", help=STORE_HELP)(f)


def json_option(f):
    """--json: print the summary as one JSON object."""
    return click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")(f)


def get_store(path: str | None, *, create: bool = False):
    """The store at --store (created with create=True)."""
    from hefeat.store.catalog import DEFAULT_STORE, Store, open_store

    if create:
        return Store.init(path or DEFAULT_STORE)
    return open_store(path)


@contextlib.contextmanager
def quiet_gc():
    """Heavy imports (torch, timm: ~400k long-lived objects) with Python's cyclic garbage collector paused.

    While they import, CPython runs full collections that each scan every object so far (0.5-1 s
    on 2 cores), and at exit its last collections scan them all again (~1 s); none of those objects
    is garbage before the process ends. The collector is paused for the block; then, in a process
    started for one command (HefeatGroup.own_process), everything alive is frozen (gc.freeze: the
    permanent generation, which no collection scans; the import-time garbage kept this way is ~7 MB)
    and collection resumes for what the command itself allocates. In a longer-lived process (tests,
    CliRunner) the pause is all: nothing is frozen there.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if HefeatGroup.own_process:
            gc.freeze()
        if was:
            gc.enable()


def emit(summary: dict, as_json: bool, text: str) -> None:
    """Print a summary paragraph, or the summary as JSON (strict: NaN/Infinity become null, with a note)."""
    if as_json:
        click.echo(to_json(summary))
    else:
        click.echo(text)


def to_json(obj) -> str:
    """Strict JSON of a CLI result: a non-finite number is written as null and named in `json_notes`
    (json.dumps would write NaN/Infinity, which no JSON parser accepts)."""
    notes: list[str] = []
    clean = _finite(obj, "", notes)
    if notes and isinstance(clean, dict):
        shown = notes[:20] + ([f"... {len(notes) - 20} more"] if len(notes) > 20 else [])
        clean["json_notes"] = [*clean.get("json_notes", []), *shown]
    return json.dumps(clean, default=str, allow_nan=False)


def _finite(v, where: str, notes: list[str]):
    import math

    if isinstance(v, dict):
        return {k: _finite(x, f"{where}.{k}" if where else str(k), notes) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x, f"{where}[{i}]", notes) for i, x in enumerate(v)]
    if isinstance(v, float) or type(v).__module__ == "numpy" and hasattr(v, "dtype") and v.dtype.kind == "f":
        f = float(v)
        if not math.isfinite(f):
            notes.append(f"{where} was {f} (not a JSON number): written as null")
            return None
        return f
    return v


def progress_enabled(as_json: bool) -> bool:
    """Progress bars only for a human at a terminal."""
    return not as_json and sys.stderr.isatty()


def run_text(s: dict, what: str) -> str:
    """Text summary of a per-slide run."""
    busy = s.get("busy") or {}
    parts = [f"{what}: {s['ok']} slides done, {s['already_done']} already done, {len(s['skipped'])} skipped, "
             f"{len(s['failed'])} failed, {len(busy)} busy (another worker has them); "
             f"{s['tiles']} tiles in {s['seconds']:.1f} s ({s['tiles_per_s']:.0f} tiles/s)."]
    for label, items in (("failed", s["failed"]), ("skipped", s["skipped"]), ("busy", busy)):
        for sid, why in list(items.items())[:10]:
            parts.append(f"  {label} {sid}: {why}")
        if len(items) > 10:
            parts.append(f"  ... {len(items)} {label} in all (--json lists them)")
    return "\n".join(parts)


@click.group(cls=HefeatGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hefeat")
def main():
    """hefeat: H&E slides to a feature store, and the models fitted from it.

    \b
    Example:
      hefeat demo                 # synthetic cohort -> stores/default, end to end
      hefeat status               # what the store holds
    """


def split_ids(v: str | None) -> list[str] | None:
    """Comma-separated ids -> list (None when not given)."""
    return [x.strip() for x in v.split(",") if x.strip()] if v else None

