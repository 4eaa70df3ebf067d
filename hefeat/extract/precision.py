"""Pick the numeric precision (and memory format, batch size) by capability checks and measurement.

Why measure: whether reduced precision pays depends on the silicon, not on a flag name. A CPU with
AVX-512 but no avx512_bf16/AMX runs bf16 autocast in emulation at about half the fp32 speed; one
with avx512_bf16 runs it faster than fp32; fp16 on most CPUs falls back to reference kernels that
are 10-100x slower. On GPUs, bf16 needs compute capability >= 8.0 and fp16 tensor cores >= 7.0.

`select_precision` does, in order:
1. capability checks that only *exclude* (a precision the device cannot run natively, or at all);
2. a short calibration on real inputs: every remaining candidate (precision x memory format
   x batch size) is timed round-robin, best-of-rounds so that a busy machine hurts every candidate
   alike, and its output is compared with fp32 on the same inputs (finite, relative error);
3. `decide`: the fastest numerically sound candidate, except that a reduced precision must beat
   the fastest fp32 candidate by more than `MARGIN` to be chosen (accuracy breaks near-ties).
The choice is cached per machine + model + torch version (so it is measured once, not on every
run) and returned as a `PrecisionChoice` whose `to_dict()` goes into the run's provenance.

Reused by fine-tuning for AMP: pass a `step` that runs forward + backward.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hefeat.cpus import available_cores
from hefeat.errors import HefeatError
from hefeat.extract.numerics import PRECISIONS, apply_memory_format, autocast, ieee_fp32  # noqa: F401  (re-exported)
from hefeat.heap import reuse_freed_memory

CHOICES = ("auto", *PRECISIONS)
# Largest relative L2 error of an output row vs fp32 that still counts as numerically sound.
TOLERANCE = {"fp32": 1e-3, "bf16": 0.05, "fp16": 0.02}  # fp32: other kernels (NHWC) reorder sums
# A reduced precision must be this much faster than the best fp32 candidate to be chosen.
MARGIN = 0.03
# A candidate whose first (warm-up) pass is this many times slower than the best is not timed further.
PROBE_DROP = 4.0
# 2: drops choices cached from a single timed round on a busy machine (decisive_lead); 3: drops choices measured
# while every batch page-faulted its activations afresh (before hefeat.heap): fp32 and bf16 paid it unequally;
# 4: fp32 on CUDA is IEEE fp32 (was TF32 convolutions): its cached speeds and errors measured something else
CACHE_VERSION = 4
# Rounds differing by more than this (slowest / fastest), or other processes using more than OTHERS_BUSY
# of the CPUs (where /proc is absent: a load average above the core count),
# mean the machine was busy while measuring: the choice is used but not cached (re-measured next run),
# unless it is decisive: the winner leads every other candidate by more than the rounds varied
# (see `decisive_lead`), so no amount of that noise could have changed it.
# A timed round repeats its pass until it lasts this long: one 8-tile pass of a fast candidate took ~50 ms on the
# development VM, and its rounds varied 1.5-1.8x on a first calibration, which kept a decisive choice out of the cache.
MIN_ROUND_S = 0.15
NOISY = 1.25
# Other processes' share of all CPUs while measuring (/proc/stat minus this process) that counts as busy.
# Not the load average: the one-minute average counts this process's own threads and the extraction that
# just ended, so on a 2-core machine back-to-back runs never cached their calibration.
OTHERS_BUSY = 0.25


@dataclass(frozen=True)
class Candidate:
    """One way to run the model: autocast precision, channels-last or not, batch size (None = caller's)."""

    precision: str
    channels_last: bool = True
    batch_size: int | None = None

    @property
    def label(self) -> str:
        """Short name, e.g. 'bf16/cl/b64'."""
        return f"{self.precision}/{'cl' if self.channels_last else 'nchw'}" + (f"/b{self.batch_size}" if self.batch_size else "")


@dataclass(frozen=True)
class Trial:
    """What calibration measured for one candidate."""

    candidate: Candidate
    tiles_per_s: float
    rel_err: float
    finite: bool = True
    note: str = ""
    spread: float = 1.0  # slowest / fastest timed round: > NOISY means the machine was busy
    rounds: int = 1  # timed rounds (a busy machine can exhaust the budget after one: then the spread says nothing)


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision to run with, and why (recorded in provenance)."""

    precision: str
    channels_last: bool
    batch_size: int | None
    device: str
    source: str  # 'requested' | 'measured' | 'cache'
    reason: str
    machine: str = ""
    trials: tuple[dict, ...] = ()
    excluded: dict = field(default_factory=dict)
    key: str = ""
    fold_bn: bool = False  # BatchNorms folded into the convolutions (hefeat.extract.fold), decided with 'auto'
    fuse_residual: bool = False  # ResNet blocks' last conv + add + ReLU as one call (hefeat.extract.fold), likewise

    def to_dict(self) -> dict:
        """Plain-dict form for provenance and --json."""
        d = asdict(self)
        d["trials"] = list(self.trials)
        return d


# ----------------------------------------------------------------------------------------------
# Capabilities
# ----------------------------------------------------------------------------------------------
def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_capabilities(device: str) -> dict:
    """What the device can run: per precision 'native' | 'emulated' | 'slow' | 'no', plus identity."""
    import torch

    if device.startswith("cuda"):
        idx = torch.device(device).index or 0
        cc = torch.cuda.get_device_capability(idx)
        name = torch.cuda.get_device_name(idx)
        return {
            "kind": "cuda", "name": f"{name} (sm_{cc[0]}{cc[1]})", "compute_capability": list(cc),
            "bf16": "native" if cc >= (8, 0) else "no",
            "fp16": "native" if cc >= (7, 0) else ("slow" if cc >= (6, 0) else "no"),
        }
    if device == "cpu":
        flags = _cpu_flags()
        mk = torch.ops.mkldnn
        bf16_ok = bool(getattr(mk, "_is_mkldnn_bf16_supported", lambda: False)())
        fp16_ok = bool(getattr(mk, "_is_mkldnn_fp16_supported", lambda: False)())
        native_bf16 = bool(flags & {"avx512_bf16", "amx_bf16"}) or "bf16" in flags  # x86, or ARM FEAT_BF16
        return {
            "kind": "cpu", "name": f"{_cpu_name()}, {torch.get_num_threads()} threads",
            "isa": torch.backends.cpu.get_cpu_capability(),
            "bf16": ("native" if native_bf16 else "emulated") if bf16_ok else "no",
            "fp16": "native" if fp16_ok else "slow",
        }
    return {"kind": device.split(":")[0], "name": device, "bf16": "no", "fp16": "no"}


def candidates(caps: dict, *, batch_sizes: Sequence[int | None] = (None,)) -> tuple[list[Candidate], dict[str, str]]:
    """Candidates worth timing on a device with `caps`, and the excluded precisions with the reason."""
    excluded: dict[str, str] = {}
    precs = ["fp32"]
    for p in ("bf16", "fp16"):
        state = caps.get(p, "no")
        if state == "no":
            excluded[p] = f"{caps['name']} cannot run {p}"
        elif state == "slow" and caps["kind"] == "cpu":
            excluded[p] = f"{p} on this CPU has no native kernels (no AVX512-FP16/AMX-FP16): reference code, 10-100x slower"
        else:
            precs.append(p)
    # Memory format matters for convolutions on CPU (oneDNN) and GPU (cuDNN NHWC tensor cores).
    formats = (True, False) if caps["kind"] in ("cpu", "cuda") else (False,)
    out = [Candidate(p, cl, b) for p in precs for cl in formats for b in batch_sizes]
    return out, excluded


# ----------------------------------------------------------------------------------------------
# Running one candidate
# ----------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def first_pass_untimed(device: str) -> bool:
    """Whether a precision/format's first pass runs untimed before its probe: on CUDA it loads kernels and picks
    cuDNN algorithms (tens of ms vs a few warm), so bf16 read PROBE_DROP x slower than warm fp32 (an H200 kept fp32)."""
    return device.startswith("cuda")


def _forward_step(model, x):
    import torch

    with torch.inference_mode():
        return model(x)


def _batch(sample, n: int | None):
    """`sample` cut or tiled to n rows (calibration batches of the batch size being tried)."""
    import torch

    if n is None or n == len(sample):
        return sample
    if n < len(sample):
        return sample[:n]
    reps = -(-n // len(sample))
    return torch.cat([sample] * reps)[:n]


def rel_error(y, ref) -> float:
    """Largest relative L2 error over rows of `y` (B, ...) against `ref`."""
    y = y.detach().float().flatten(1)
    ref = ref.detach().float().flatten(1)
    num = (y - ref).norm(dim=1)
    den = ref.norm(dim=1).clamp_min(1e-12)
    return float((num / den).max())


def measure(
    model,
    sample,
    cands: Sequence[Candidate],
    *,
    device: str,
    step: Callable | None = None,
    rounds: int = 3,
    budget_s: float = 8.0,
) -> list[Trial]:
    """Time every candidate on `sample` (best of `rounds`, round-robin) and check its output vs fp32.

    `sample` is a float tensor (B, C, H, W) on `device`, already normalised; `step(model, x)`
    returns the output to compare (default: an inference-mode forward). Candidates whose warm-up
    is PROBE_DROP x slower per row than the best are dropped after one pass, so a 100x-slow kernel
    costs one small batch, not a calibration.
    """
    import torch

    step = step or _forward_step
    t_start = time.perf_counter()
    probe_n = min(len(sample), 4)
    ref_x = apply_memory_format(model, sample[:probe_n], False)
    with autocast(device, "fp32"):
        ref = step(model, ref_x)
    if not bool(torch.isfinite(torch.as_tensor(ref)).all()):
        raise HefeatError("the encoder gives non-finite outputs in fp32 on real tiles: check its weights")

    rates: dict[Candidate, list[float]] = {}
    probe: dict[Candidate, float] = {}
    errs: dict[Candidate, tuple[float, bool]] = {}
    done_keys: dict[tuple, tuple[float, float, bool]] = {}
    for c in cands:  # warm-up + numerics on the first rows (batch size does not change either)
        k = (c.precision, c.channels_last)
        if k not in done_keys:
            x = apply_memory_format(model, sample[:probe_n], c.channels_last)
            if first_pass_untimed(device):
                with autocast(device, c.precision):
                    step(model, x)
                _sync(device)
            t = time.perf_counter()
            with autocast(device, c.precision):
                y = step(model, x)
            _sync(device)
            dt = (time.perf_counter() - t) / probe_n
            fin = bool(torch.isfinite(y.float()).all())
            done_keys[k] = (dt, rel_error(y, ref) if fin else float("inf"), fin)
        dt, err, fin = done_keys[k]
        probe[c] = dt
        errs[c] = (err, fin)
    best_probe = min(probe.values())
    # fp32 is the baseline every decision compares with: it is always timed.
    alive = [c for c in cands if (probe[c] <= PROBE_DROP * best_probe or c.precision == "fp32") and errs[c][1]]
    best: dict[Candidate, float] = {}
    notes: dict[Candidate, str] = {c: f"warm-up {probe[c] / best_probe:.1f}x slower than best: not timed"
                                   for c in cands if c not in alive}
    for c in cands:
        if not errs[c][1]:
            notes[c] = "non-finite output"
    for r in range(rounds):
        for c in alive:
            x = apply_memory_format(model, _batch(sample, c.batch_size), c.channels_last)
            if r == 0 and len(x) != probe_n:  # a batch shape the warm-up did not run: warm it up untimed (oneDNN
                # makes its primitives per shape; a timed first pass reads as a busy machine and is never cached)
                with autocast(device, c.precision):
                    step(model, x)
            _sync(device)
            t, rows = time.perf_counter(), 0
            try:
                while True:  # passes until the round lasts MIN_ROUND_S: one fast pass is too short to time steadily
                    with autocast(device, c.precision):
                        step(model, x)
                    _sync(device)
                    rows += len(x)
                    if time.perf_counter() - t >= MIN_ROUND_S:
                        break
            except torch.OutOfMemoryError:
                notes[c] = "out of memory"
                best[c] = 0.0
                continue
            rate = rows / (time.perf_counter() - t)
            best[c] = max(best.get(c, 0.0), rate)
            rates.setdefault(c, []).append(rate)
        if r == 0 and best:  # hopeless candidates stop here
            top = max(best.values())
            alive = [c for c in alive if (best.get(c, 0) >= top / 2 or c.precision == "fp32")
                     and notes.get(c) != "out of memory"]
        if time.perf_counter() - t_start > budget_s:
            break
    return [Trial(c, round(best.get(c, 0.0), 3), errs[c][0], errs[c][1], notes.get(c, ""),
                  round(max(rates[c]) / min(rates[c]), 3) if len(rates.get(c, ())) > 1 and min(rates[c]) > 0 else 1.0,
                  len(rates.get(c, ())))
            for c in cands]


@dataclass(frozen=True)
class CpuSample:
    """The machine's busy CPU-seconds (all CPUs) and this process's own, at one moment."""

    wall: float
    busy: float
    ours: float


def cpu_sample() -> CpuSample | None:
    """/proc/stat's busy time (not idle, not iowait; steal included) and this process's CPU time, or None."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    if len(ticks) < 4:
        return None
    t = os.times()
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return CpuSample(time.monotonic(), (sum(ticks) - idle) / hz, t.user + t.system)


def others_share(a: CpuSample | None, b: CpuSample | None, cpus: int | None = None) -> float | None:
    """The share of all CPUs that other processes used between samples a and b (None if unknown)."""
    if a is None or b is None or b.wall <= a.wall:
        return None
    others = (b.busy - a.busy) - (b.ours - a.ours)
    return max(0.0, others) / ((b.wall - a.wall) * (cpus or os.cpu_count() or 1))


def busy_machine(trials: Sequence[Trial], others: float | None = None) -> str | None:
    """Why these measurements should not be trusted for later runs (noisy rounds, other processes), or None.

    others: other processes' share of the CPUs while measuring (`others_share`); None falls back to the
    load average, which also counts this process."""
    worst = max((t.spread for t in trials if t.tiles_per_s > 0), default=1.0)
    if worst > NOISY:
        return f"timed rounds differed by {worst:.2f}x"
    if others is not None:
        return f"other processes used {others:.0%} of the CPUs" if others > OTHERS_BUSY else None
    with contextlib.suppress(OSError, AttributeError):
        load, cores = os.getloadavg()[0], available_cores()
        if load > cores:
            return f"load average {load:.1f} on {cores} cores"
    return None


def decisive_lead(trials: Sequence[Trial], chosen: Candidate) -> float | None:
    """The chosen candidate's lead (its tiles/s over the fastest other timed candidate's) when that lead
    exceeds both NOISY and the largest spread of any candidate's timed rounds, else None.

    A busy machine slows the round-robin rounds of every candidate alike; a lead larger than any
    round-to-round variation was not made by the load, so such a measurement is worth caching. The
    chosen candidate must have been timed in two rounds or more (one round shows no variation: then
    nothing is decisive). The fastest other, where `measure` stopped it after one round as hopeless (under
    half the best rate), may be off by the noise itself: then the lead must exceed the noise squared (a
    first calibration here: bf16/cl 187 tiles/s in rounds 1.53x apart, bf16/nchw 54 once: 3.5x > 2.3x).
    """
    timed = [t for t in trials if t.tiles_per_s > 0]
    win = [t for t in timed if t.candidate == chosen]
    others = [t for t in timed if t.candidate != chosen]
    if not win or not others:
        return None
    runner_up = max(others, key=lambda t: t.tiles_per_s)
    if win[0].rounds < 2:
        return None
    lead = win[0].tiles_per_s / runner_up.tiles_per_s
    noise = max([NOISY, *(t.spread for t in timed if t.rounds >= 2)])
    # a runner-up timed once (measure drops one under half the best after a round) may itself be off by the noise
    need = noise if runner_up.rounds >= 2 else noise * noise
    return round(lead, 3) if lead > need else None


# ----------------------------------------------------------------------------------------------
# Deciding
# ----------------------------------------------------------------------------------------------
def decide(trials: Sequence[Trial], *, margin: float = MARGIN, tolerance: dict | None = None) -> tuple[Candidate, str]:
    """The fastest sound candidate; a reduced precision must beat the best fp32 by more than `margin`.

    Pure function of the measurements (tests inject timings). Returns (candidate, reason).
    """
    tol = {**TOLERANCE, **(tolerance or {})}
    sound = [t for t in trials if t.finite and t.tiles_per_s > 0 and t.rel_err <= tol[t.candidate.precision]]
    rejected = [t for t in trials if t not in sound and t.tiles_per_s > 0]
    fp32 = [t for t in sound if t.candidate.precision == "fp32"]
    if not fp32:
        raise HefeatError("calibration measured no fp32 candidate; cannot decide a precision")
    best32 = max(fp32, key=lambda t: t.tiles_per_s)
    best = max(sound, key=lambda t: t.tiles_per_s)
    if best.candidate.precision != "fp32" and best.tiles_per_s <= best32.tiles_per_s * (1 + margin):
        best = best32
    parts = [f"{best.candidate.label} {best.tiles_per_s:.1f} tiles/s"]
    if best is not best32:
        parts.append(f"{best.tiles_per_s / best32.tiles_per_s:.2f}x the best fp32 ({best32.candidate.label} "
                     f"{best32.tiles_per_s:.1f}); max relative error vs fp32 {best.rel_err:.2%} "
                     f"<= {tol[best.candidate.precision]:.0%}")
    else:
        faster = [t for t in sound if t.candidate.precision != "fp32"]
        if faster:
            f = max(faster, key=lambda t: t.tiles_per_s)
            parts.append(f"reduced precision not faster by > {margin:.0%} (best {f.candidate.label} "
                         f"{f.tiles_per_s:.1f} tiles/s)")
    for t in trials:
        if t.tiles_per_s == 0 and t.note and t.finite:
            parts.append(f"{t.candidate.label} {t.note}")
    for t in rejected:
        why = "non-finite output" if not t.finite else f"relative error {t.rel_err:.2%} > {tol[t.candidate.precision]:.0%}"
        parts.append(f"{t.candidate.label} rejected: {why}")
    return best.candidate, "; ".join(parts)


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """$HEFEAT_CACHE_DIR, else $XDG_CACHE_HOME/hefeat, else ~/.cache/hefeat."""
    if os.environ.get("HEFEAT_CACHE_DIR"):
        return Path(os.environ["HEFEAT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hefeat"


def cache_key(caps: dict, model_key: dict, device: str, cands: Sequence[Candidate], sample_shape) -> str:
    """Hash of the machine (device identity, ISA, threads), torch version, the model and what was tried."""
    import torch

    blob = json.dumps({"v": CACHE_VERSION, "caps": caps, "torch": torch.__version__, "model": model_key,
                       "device": device.split(":")[0], "cands": [c.label for c in cands],
                       "shape": list(sample_shape)[1:]}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _cache_file() -> Path:
    return cache_dir() / "precision.json"


def _cache_get(key: str) -> dict | None:
    try:
        return json.loads(_cache_file().read_text()).get(key)
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _calibration_lock():
    """An advisory lock on the cache folder (POSIX flock); a no-op where that is unavailable."""
    try:
        import fcntl

        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        f = open(folder / ".calibration.lock", "a+")  # noqa: SIM115
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
    finally:
        f.close()


def _cache_put(key: str, value: dict) -> None:
    from hefeat.store.atomic import write_json

    path = _cache_file()
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        data = {}
    data[key] = value
    with contextlib.suppress(OSError):  # a read-only home must not stop an extraction
        write_json(path, data)


def _cached_choice(hit: dict, device: str) -> PrecisionChoice:
    fields = set(PrecisionChoice.__dataclass_fields__)
    kept = {k: v for k, v in hit.items() if k in fields}
    return PrecisionChoice(**{**kept, "trials": tuple(hit.get("trials", ())), "source": "cache", "device": device})


def cached_precision(model, sample_shape: Sequence[int], *, device: str, model_key: dict | None = None,
                     batch_sizes: Sequence[int | None] = (None,)) -> PrecisionChoice | None:
    """What select_precision('auto') answers from this machine's cache for a sample of `sample_shape`, or None
    when it would measure; needs no sample, so a caller can skip reading one. On a hit the model is left
    in the chosen memory format. (Reads without the calibration lock: the cache is replaced atomically.)"""
    caps = device_capabilities(device)
    cands, _ = candidates(caps, batch_sizes=batch_sizes)
    hit = _cache_get(cache_key(caps, model_key or {"model": type(model).__name__}, device, cands, tuple(sample_shape)))
    if not hit:
        return None
    choice = _cached_choice(hit, device)
    import torch

    model.to(memory_format=torch.channels_last if choice.channels_last else torch.contiguous_format)
    return choice


# ----------------------------------------------------------------------------------------------
# The one entry point
# ----------------------------------------------------------------------------------------------
def select_precision(
    model,
    sample,
    *,
    device: str,
    requested: str = "auto",
    model_key: dict | None = None,
    batch_sizes: Sequence[int | None] = (None,),
    step: Callable | None = None,
    use_cache: bool = True,
) -> PrecisionChoice:
    """Resolve `requested` ('auto' | 'fp32' | 'bf16' | 'fp16') to a PrecisionChoice for `model` on `device`.

    sample: float tensor (B, C, H, W) of real, normalised inputs on `device` (B of 8-16 is enough).
    model_key: what identifies the model for the cache (name, layer, weights digest, input size).
    A fixed request is honoured (channels-last on); 'auto' measures, or reuses this machine's
    cached measurement for the same model. The model is left in the chosen memory format.
    """
    if requested not in CHOICES:
        raise HefeatError(f"--precision must be one of {', '.join(CHOICES)}, got {requested!r}")
    caps = device_capabilities(device)
    if requested != "auto":
        if caps.get(requested, "no") == "no" and requested != "fp32":
            raise HefeatError(f"{caps['name']} cannot run {requested}; use --precision fp32 or auto")
        apply_memory_format(model, sample, True)
        return PrecisionChoice(requested, True, None, device, "requested", f"--precision {requested}", caps["name"])
    cands, excluded = candidates(caps, batch_sizes=batch_sizes)
    key = cache_key(caps, model_key or {"model": type(model).__name__}, device, cands, tuple(sample.shape))
    # One calibration at a time per machine: concurrent workers would slow each other's timings,
    # and the second one finds the first one's answer in the cache.
    with _calibration_lock() if use_cache else contextlib.nullcontext():
        hit = _cache_get(key) if use_cache else None
        if hit:
            choice = _cached_choice(hit, device)
            apply_memory_format(model, sample, choice.channels_last)
            return choice
        before = cpu_sample()
        with reuse_freed_memory():  # timed as the loops run (hefeat.heap)
            trials = measure(model, sample, cands, device=device, step=step)
        others = others_share(before, cpu_sample())
        best, reason = decide(trials)
        busy = busy_machine(trials, others) if device == "cpu" else None
        lead = decisive_lead(trials, best) if busy else None
        if busy and lead:
            reason += f"; measured while busy ({busy}) but cached: it leads the next candidate {lead:.2f}x"
        elif busy:
            reason += f"; not cached: {busy} while measuring"
        choice = PrecisionChoice(
            best.precision, best.channels_last, best.batch_size, device, "measured", reason, caps["name"],
            tuple({"candidate": t.candidate.label, "tiles_per_s": t.tiles_per_s, "rel_err": round(t.rel_err, 5)
                   if t.finite else None, "spread": t.spread, "rounds": t.rounds, "note": t.note} for t in trials),
            excluded, key)
        if use_cache and (not busy or lead):
            _cache_put(key, {**choice.to_dict(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    apply_memory_format(model, sample, best.channels_last)
    return choice
