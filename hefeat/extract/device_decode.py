"""The device-decode reader of an extraction: each slide's JPEG tiles decoded on the GPU, in full batches.

Whether a slide's tiles decode on the device as tifffile decodes them depends on how they were encoded
(photometric, JPEG tables, subsampling: `jpeg_tiles.encoding_key`), which one scanner's slides share. So the
check (`jpeg_tiles.check_device_decode`, one tile decoded twice) runs once per encoding as each slide is opened
for reading, not for every slide of the run before the first batch: at 10,000 slides that was 10,000 extra opens
and 20,000 decodes of start-up. The first slide decides the run: under `auto`, a cohort whose first slide is not
a JPEG-tiled TIFF/SVS (or decodes differently) is read by the CPU reader, with its worker processes. A later slide
that is not JPEG-tiled or decodes differently is read on the CPU by the reading thread under `auto` (its status
row says so), and fails alone under `device`.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import numpy as np

from hefeat.errors import HefeatError
from hefeat.extract.reading import TileDataset, read_tile
from hefeat.extract.writer import SlideFeatures

PROBE_SLIDES = 8  # slides tried in order for the run's decision when the first ones cannot be opened or checked


class DecodeGate:
    """Which slides decode on the device: one check per JPEG encoding, remembered for the run."""

    def __init__(self, device: str, strict: bool):
        self.device, self.strict = device, strict
        self.same: dict[tuple, bool] = {}

    def same_decode(self, src, level) -> bool:
        """Whether `level` of `src` (a JpegTiles) decodes on the device as tifffile decodes it (raises where its
        first tile does not decode: that says nothing about the encoding, so nothing is remembered)."""
        from hefeat.slides.jpeg_tiles import check_device_decode, encoding_key

        key = encoding_key(src, level)
        if key not in self.same:
            self.same[key] = check_device_decode(src, self.device, level)
        return self.same[key]

    def why_not(self, src, level) -> str | None:
        """None if the slide's tiles are to be decoded on the device, else why not."""
        try:
            return None if self.same_decode(src, level) else "its device decode differs from tifffile's"
        except Exception as e:  # noqa: BLE001
            if self.strict:  # decoded on the device anyway: a tile that does not decode fails the slide
                return None
            return f"its first JPEG tile did not decode for the check ({type(e).__name__}: {e})"

    def probe(self, paths: list[str]) -> str | None:
        """Why the run should not decode on the device (None: it should), from the first slide that can be checked.

        Under decode='device' a first slide that is not JPEG-tiled or decodes differently is an error."""
        from hefeat.slides.jpeg_tiles import JpegTiles, NotJpegTiled

        unchecked = []
        for path in paths[:PROBE_SLIDES]:
            name = Path(path).name
            try:
                with JpegTiles(path) as src:
                    if self.same_decode(src, src.levels[0]):
                        return None
                    why = f"device decode of {name} differs from tifffile's"
            except NotJpegTiled as e:
                why = str(e)
            except Exception as e:  # noqa: BLE001  (unreadable, or its first tile does not decode: the next decides)
                unchecked.append(f"{name} ({type(e).__name__}: {e})")
                continue
            if self.strict:
                raise HefeatError(f"decode=device: {why}")
            return why
        if self.strict or not unchecked:
            return None
        return f"none of the first {len(unchecked)} slides could be checked: {'; '.join(unchecked)}"


def device_decoded_batches(jobs: list[SlideFeatures], source, paths: list[str], ds: TileDataset, batch_size: int,
                           device: str, decode: str, info: dict):
    """Batches (imgs on `device`, slide ks, tile ts, errors) decoded by hefeat.slides.jpeg_tiles, or None.

    Used when `decode` is 'device', or 'auto' on CUDA, and the run's first slide (`paths`, in order) is a
    JPEG-tiled TIFF/SVS whose device decode matches tifffile's; the reason for using it or not goes into
    `info["decode"]`. Slides come from `source` (claimed one at a time by the runner) and are appended to `jobs`.
    """
    if decode not in ("auto", "cpu", "device"):
        raise HefeatError(f"decode must be auto, cpu or device, got {decode!r}")
    if decode == "cpu" or (decode == "auto" and not device.startswith("cuda")):
        info["decode"] = "cpu (OpenSlide or the direct JPEG reader)"
        return None
    gate = DecodeGate(device, strict=decode == "device")
    why = gate.probe(paths)
    if why is not None:
        info["decode"] = f"cpu ({why})"
        return None
    info["decode"] = f"device ({device}, torchvision decode_jpeg; read and decoded by a thread ahead of the forward)"
    return batches(jobs, source, ds, batch_size, device, gate)


def cpu_read_note(jobs: list[SlideFeatures]) -> str | None:
    """What the run's `decode` adds for the slides a device-decode run read on the CPU (each row says why), or None."""
    on_cpu = [j for j in jobs if j.decode]
    if not on_cpu:
        return None
    return (f"{len(on_cpu)} slide{'s' if len(on_cpu) > 1 else ''} read on the CPU instead (first: {on_cpu[0].slide_id}, "
            f"{on_cpu[0].decode})")


def batches(jobs: list[SlideFeatures], source, ds: TileDataset, batch_size: int, device: str, gate: DecodeGate):
    """Full batches across slide boundaries, as the CPU path's sampler makes them (only the last is short).
    A slide that cannot be opened or decoded contributes one white row carrying the error: it fails alone."""
    import torch

    out = _Batch(batch_size)
    for j in source:
        jobs.append(j)
        k, a = len(jobs) - 1, 0
        try:
            with ExitStack() as stack:
                read = _slide_reader(stack, j, ds, device, gate)
                while a < len(j.coords):
                    xy = j.coords[a:a + out.room]
                    imgs, errs = read(xy)
                    full, a = out.add(imgs, k, a, errs), a + len(xy)
                    if full:
                        yield full
        except Exception as e:  # noqa: BLE001  (the slide fails through the main loop, the others go on)
            white = torch.full((1, ds.size, ds.size, 3), 255, dtype=torch.uint8, device=device)
            full = out.add(white, k, min(a, max(len(j.coords) - 1, 0)), [f"{type(e).__name__}: {e}"])
            if full:
                yield full
    if out.have:
        yield out.take()


def _slide_reader(stack: ExitStack, j: SlideFeatures, ds: TileDataset, device: str, gate: DecodeGate):
    """read(xy) -> (uint8 (B, size, size, 3) on `device`, errors) for slide `j`, opened on `stack`.

    The device decode where its tiles allow it; else (under decode='auto') OpenSlide or the direct reader on this
    thread, the reason kept in `j.decode` for the slide's status row."""
    import torch

    from hefeat.slides.jpeg_tiles import JpegTiles, NotJpegTiled, read_regions
    from hefeat.slides.reader import Slide

    s = stack.enter_context(Slide(j.path, mpp=j.mpp))
    try:
        src = stack.enter_context(JpegTiles(j.path))
    except NotJpegTiled as e:
        why = str(e)
    else:
        level = src.levels[min(s.best_level(ds.mpp), len(src.levels) - 1)]
        why = gate.why_not(src, level)
    if why is None:
        down = s.dimensions[0] / level.width
        n = max(1, int(round(s.level0_size(ds.size, ds.mpp) / down)))

        def on_device(xy):
            regions = [(int(round(x / down)), int(round(y / down)), n) for x, y in xy]
            return read_regions(src, level, regions, ds.size, device), [""] * len(xy)

        return on_device
    if gate.strict:
        raise HefeatError(f"decode=device: {why}")
    j.decode = f"cpu ({why})"

    def on_cpu(xy):
        tiles = [read_tile(s, x, y, ds.size, ds.mpp) for x, y in xy]
        return torch.from_numpy(np.stack([t[0] for t in tiles])).to(device), [t[1] for t in tiles]

    return on_cpu


class _Batch:
    """Pieces of consecutive slides' rows collected until the batch is full."""

    def __init__(self, size: int):
        self.size, self.pieces, self.have = size, [], 0

    @property
    def room(self) -> int:
        """Rows still missing from a full batch."""
        return self.size - self.have

    def add(self, imgs, k: int, first: int, errs: list[str]):
        """Add rows first.. of slide k (one error string per row); the joined batch once it is full, else None."""
        self.pieces.append((imgs, k, first, errs))
        self.have += len(imgs)
        return self.take() if self.have >= self.size else None

    def take(self):
        """(imgs, ks, ts, errors) of the rows collected so far; empties the batch."""
        import torch

        p, self.pieces, self.have = self.pieces, [], 0
        imgs = p[0][0] if len(p) == 1 else torch.cat([c[0] for c in p])
        ks = torch.cat([torch.full((len(c[0]),), c[1]) for c in p])
        ts = torch.cat([torch.arange(c[2], c[2] + len(c[0])) for c in p])
        return imgs, ks, ts, [e for c in p for e in c[3]]
