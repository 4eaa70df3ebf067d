"""Tiles decoded on the device: raw JPEG tiles of a tiled TIFF/SVS read with tifffile, decoded in batches.

On a GPU machine the CPU decode (~1-1.3k JPEG tiles/s per core) bounds extraction long before the
GPU does. This reader moves only compressed bytes through the CPU: it reads the JPEG tiles that
cover a batch of requested regions (each once), decodes them with `torchvision.io.decode_jpeg` on
the device (nvJPEG on CUDA; libjpeg-turbo on the CPU as the fallback), pastes the regions together
and resizes them there. Pixels equal OpenSlide's within JPEG decoder tolerance (tests check it).

Abbreviated TIFF JPEG tiles are completed with the level's JPEGTables; tiles whose photometric
interpretation is RGB (Aperio) get an Adobe APP14 marker (transform 0) so decoders do not apply a
YCbCr conversion. `check_device_decode` compares the device decode of one tile with tifffile's own
(imagecodecs) decode and the caller falls back to the CPU if they disagree.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass

import numpy as np

from hefeat.errors import HefeatError

JPEG = 7
_PREAD = hasattr(os, "pread")
# Adobe APP14: version 100, flags 0/0, transform 0 = components are RGB (no YCbCr conversion).
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


class NotJpegTiled(HefeatError):
    """The file reads, but has no JPEG-tiled level: device decode does not apply to it."""


@dataclass(frozen=True)
class Level:
    """One pyramid level's JPEG tile grid."""

    index: int
    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: tuple[int, ...]
    counts: tuple[int, ...]
    tables: bytes | None
    rgb: bool  # photometric RGB (not YCbCr) inside the JPEG streams

    @property
    def cols(self) -> int:
        """Tiles per row."""
        return math.ceil(self.width / self.tile_w)

    @property
    def rows(self) -> int:
        """Tile rows."""
        return math.ceil(self.height / self.tile_h)


class JpegTiles:
    """The JPEG-compressed tile levels of a tiled TIFF/SVS, as raw bytes (no decode on the CPU)."""

    def __init__(self, path: str | os.PathLike):
        import tifffile

        self.path = str(path)
        try:
            tf = tifffile.TiffFile(self.path)
        except Exception as e:
            raise HefeatError(f"tifffile cannot read {path}: {type(e).__name__}: {e}") from None
        try:
            pages = [p for p in tf.series[0].levels] if tf.series else []
            self.levels = []
            for i, lv in enumerate(pages):
                p = lv.keyframe if hasattr(lv, "keyframe") else lv.pages[0]
                if not (p.is_tiled and p.compression == JPEG and p.planarconfig == 1 and p.samplesperpixel in (3, 4)):
                    break
                self.levels.append(Level(i, int(p.imagewidth), int(p.imagelength), int(p.tilewidth), int(p.tilelength),
                                         tuple(int(v) for v in p.dataoffsets), tuple(int(v) for v in p.databytecounts),
                                         bytes(p.jpegtables) if p.jpegtables is not None else None,
                                         int(p.photometric) == 2))
        finally:
            tf.close()
        if not self.levels:
            raise NotJpegTiled(f"{path} has no JPEG-tiled level: device decode needs a tiled JPEG TIFF/SVS")
        self._fh = open(self.path, "rb")  # noqa: SIM115  (closed in close())
        self._seek_lock = threading.Lock()

    def close(self) -> None:
        """Close the file."""
        self._fh.close()

    def __enter__(self) -> JpegTiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def raw(self, level: Level, index: int) -> bytes:
        """The tile's bytes as stored (an abbreviated JPEG stream when the level has JPEGTables)."""
        if _PREAD:  # no shared file position: threads may read one slide at once
            return os.pread(self._fh.fileno(), level.counts[index], level.offsets[index])
        with self._seek_lock:  # Windows has no pread
            self._fh.seek(level.offsets[index])
            return self._fh.read(level.counts[index])

    def stream(self, level: Level, index: int) -> bytes:
        """A complete JPEG stream for tile `index` of `level` (tables merged, RGB marked)."""
        data = self.raw(level, index)
        if level.tables and len(level.tables) > 4:
            data = level.tables[:-2] + data[2:]  # tables' SOI..(no EOI) + tile's (no SOI)..EOI
        if level.rgb:
            data = data[:2] + _ADOBE_RGB + data[2:]
        return data

    def covering(self, level: Level, x: int, y: int, w: int, h: int) -> list[int]:
        """Indices of the tiles of `level` that overlap the region (level pixels), inside the image."""
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(level.width, x + w), min(level.height, y + h)
        if x1 <= x0 or y1 <= y0:
            return []
        cs = range(x0 // level.tile_w, (x1 - 1) // level.tile_w + 1)
        rs = range(y0 // level.tile_h, (y1 - 1) // level.tile_h + 1)
        return [r * level.cols + c for r in rs for c in cs]

    def pieces(self, level: Level, x: int, y: int, n: int) -> list[tuple[int, tuple[slice, slice], tuple[slice, slice]]]:
        """(tile index, rows/cols in the n x n region, rows/cols in the decoded tile) for each tile overlapping the
        square region at (x, y): only the part inside both the region and the image (edge tiles are stored padded)."""
        out = []
        for i in self.covering(level, x, y, n, n):
            tx, ty = (i % level.cols) * level.tile_w, (i // level.cols) * level.tile_h
            x0, y0 = max(x, tx), max(y, ty)
            x1, y1 = min(x + n, tx + level.tile_w, level.width), min(y + n, ty + level.tile_h, level.height)
            if x1 > x0 and y1 > y0:
                out.append((i, (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x)),
                            (slice(y0 - ty, y1 - ty), slice(x0 - tx, x1 - tx))))
        return out


def decode(streams: list[bytes], device: str, rgb: bool = False):
    """Decode JPEG streams to uint8 (3, h, w) tensors on `device` (batched nvJPEG on CUDA).

    rgb: the streams hold RGB components (photometric RGB, Aperio), not YCbCr. libjpeg honours their Adobe
    marker; nvJPEG's hardware decoder converted them as YCbCr anyway (an H200 gave CMU-1 wrong colours), so
    they are decoded without any colour conversion (ImageReadMode.UNCHANGED: the components as stored).
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams]
    if not data:
        return []
    out = decode_jpeg(data, mode=ImageReadMode.UNCHANGED if rgb else ImageReadMode.RGB, device=device)
    return [t[:3] for t in out] if rgb else out


def read_regions(src: JpegTiles, level: Level, regions: list[tuple[int, int, int]], size_px: int, device: str):
    """uint8 (B, size_px, size_px, 3) tensor on `device`: square regions (x, y, n) in `level` pixels, resized.

    Each JPEG tile is decoded once per call even when several regions share it; outside the image is white.
    On a GPU each region is cut from the block of tiles around it, the blocks made by one gather of whole
    tiles (`_cut_blocks`): pasting each tile's overlap was ~1,300 small launches and ~30 ms of Python per
    batch of 256. On the CPU pasting is the faster of the two (`_cut_paste`, ~120 vs ~300 ms per 256).
    """
    import torch

    from hefeat.slides.resample import resize

    if not regions:
        return torch.empty((0, size_px, size_px, 3), dtype=torch.uint8, device=device)
    need = sorted({i for x, y, n in regions for i in src.covering(level, x, y, n, n)})
    decoded = dict(zip(need, decode([src.stream(level, i) for i in need], device, level.rgb), strict=True))
    cut = _cut_paste if device == "cpu" else _cut_blocks
    out = torch.empty((len(regions), size_px, size_px, 3), dtype=torch.uint8, device=device)
    for n in sorted({r[2] for r in regions}):
        idx = [i for i, r in enumerate(regions) if r[2] == n]
        img = cut(src, level, decoded, [regions[i] for i in idx], n, device)  # (B, n, n, 3)
        out[torch.as_tensor(idx, device=device)] = resize(img, size_px)  # as the CPU reader resizes
    return out


def _cut_paste(src: JpegTiles, level: Level, decoded: dict, regions: list[tuple[int, int, int]], n: int, device: str):
    """(B, n, n, 3): each region a white canvas with each decoded tile's overlap pasted in."""
    import torch

    out = torch.full((len(regions), n, n, 3), 255, dtype=torch.uint8, device=device)
    for j, (x, y, _) in enumerate(regions):
        for i, (rows, cols), (trows, tcols) in src.pieces(level, x, y, n):
            out[j, rows, cols] = decoded[i][:, trows, tcols].permute(1, 2, 0)
    return out


def _cut_blocks(src: JpegTiles, level: Level, decoded: dict, regions: list[tuple[int, int, int]], n: int,
                device: str):
    """(B, n, n, 3): the same pixels as `_cut_paste`, by a gather of whole tiles into each region's block."""
    import torch

    need = list(decoded)
    tiles = _tile_stack([decoded[i] for i in need], level, device)  # (T + 1, th, tw, 3); T is white
    th, tw = level.tile_h, level.tile_w
    slot = {t: k for k, t in enumerate(need)}
    white = len(need)
    kr, kc = -(-n // th) + 1, -(-n // tw) + 1  # tile rows/cols a region of n px can touch
    blocks, offsets = [], []
    for x, y, _ in regions:
        r0, c0 = y // th, x // tw
        blocks.append([slot.get(r * level.cols + c, white) if 0 <= r < level.rows and 0 <= c < level.cols else white
                       for r in range(r0, r0 + kr) for c in range(c0, c0 + kc)])
        offsets.append((y - r0 * th, x - c0 * tw))
    # whole tiles by index_select (rows of th * tw * 3 bytes): ~7x faster on a CPU than tiles[index]
    b = tiles.view(len(tiles), -1).index_select(0, torch.as_tensor(blocks, device=device).view(-1))
    b = b.view(len(regions), kr, kc, th, tw, 3).permute(0, 1, 3, 2, 4, 5).reshape(len(regions), kr * th, kc * tw, 3)
    img = torch.stack([b[j, oy:oy + n, ox:ox + n] for j, (oy, ox) in enumerate(offsets)])
    edge = [j for j, (x, y, _) in enumerate(regions) if min(x, y) < 0 or x + n > level.width or y + n > level.height]
    if edge:  # edge tiles are stored padded: what lies outside the image is white
        ar = torch.arange(n, device=device)
        xs = torch.as_tensor([regions[j][0] for j in edge], device=device)[:, None] + ar
        ys = torch.as_tensor([regions[j][1] for j in edge], device=device)[:, None] + ar
        inside = ((ys >= 0) & (ys < level.height))[:, :, None] & ((xs >= 0) & (xs < level.width))[:, None, :]
        e = torch.as_tensor(edge, device=device)
        img[e] = img[e].masked_fill(~inside[..., None], 255)
    return img


def _tile_stack(decoded, level: Level, device: str):
    """(T + 1, tile_h, tile_w, 3) uint8: the decoded tiles (channels last) and a white tile at index T.

    TIFF stores every tile at the full tile size (edge tiles padded); a stream of another size is a damaged
    slide, refused as OpenSlide refuses it, not cropped or padded into place.
    """
    import torch

    th, tw = level.tile_h, level.tile_w
    white = torch.full((1, th, tw, 3), 255, dtype=torch.uint8, device=device)
    if not len(decoded):
        return white
    wrong = [tuple(t.shape[1:]) for t in decoded if tuple(t.shape) != (3, th, tw)]
    if wrong:
        raise ValueError(f"a JPEG tile decoded to {wrong[0][0]} x {wrong[0][1]} px where the level's tiles are "
                         f"{th} x {tw}: the slide's tile data is damaged")
    return torch.cat([torch.stack(list(decoded)).permute(0, 2, 3, 1), white])


def check_device_decode(src: JpegTiles, device: str, level: Level | None = None, tolerance: float = 2.0) -> bool:
    """True if the device decodes the level's first tile (default: level 0's) like tifffile/imagecodecs does
    (mean abs difference)."""
    import tifffile

    level = level or src.levels[0]
    with tifffile.TiffFile(src.path) as tf:
        page = tf.series[0].levels[level.index].keyframe
        ref, _, _ = page.decode(src.raw(level, 0), 0, jpegtables=page.jpegtables)
    got = decode([src.stream(level, 0)], device, level.rgb)[0].permute(1, 2, 0).cpu().numpy()
    ref = np.asarray(ref).reshape(got.shape[0], got.shape[1], -1)[..., :3]
    return float(np.abs(got.astype(np.int16) - ref.astype(np.int16)).mean()) <= tolerance


def encoding_key(src: JpegTiles, level: Level) -> tuple:
    """What decides how a level's tiles decode: photometric, the level's JPEG tables and its first tile's frame
    header (sample precision, components and their subsampling). One scanner's slides share it, so a decode
    check made for one of them holds for all (hefeat.extract.device_decode checks once per key)."""
    return level.rgb, level.tables, frame_header(src.raw(level, 0))


def frame_header(data: bytes) -> bytes:
    """The SOFn marker and segment of a JPEG stream, less the image height and width (b"" if none before the scan)."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:  # start of scan: no frame header in the stream (abbreviated beyond the standard)
            break
        n = int.from_bytes(data[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0..15, not DHT, JPG, DAC
            seg = data[i + 4:i + 2 + n]
            return bytes([marker]) + seg[:1] + seg[5:]
        i += 2 + n
    return b""
