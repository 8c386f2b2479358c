"""What is on the pages of a PDF that matplotlib wrote, read without a PDF library (none is installed, nor
pdftoppm): the page objects, and per page its drawing operators, text runs and decoded raster images.

matplotlib's PDF backend writes one uncompressed object table; content streams and images are Flate
streams, images possibly with PNG row predictors and an indexed palette. That is all this reads.
"""

from __future__ import annotations

import collections
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_OBJ = re.compile(rb"(\d+) 0 obj(.*)endobj", re.S)
_REF = rb"(\d+) 0 R"


@dataclass
class Page:
    operators: collections.Counter          # content-stream operator -> count ("S" strokes, "TJ" text runs ...)
    images: list[np.ndarray] = field(default_factory=list)   # every image drawn ("Do"), as grey levels 0..255


def _stream(obj: bytes, objs: dict[int, bytes]) -> tuple[bytes, bytes]:
    """The dictionary and the decoded data of a stream object (its exact /Length, direct or indirect)."""
    head, _, rest = obj.partition(b"stream\n")
    length = re.search(rb"/Length (\d+)( 0 R)?", head)
    n = int(objs[int(length.group(1))].strip()) if length.group(2) else int(length.group(1))
    data = rest[:n]
    return head, zlib.decompress(data) if b"/FlateDecode" in head else data


def _unpredict(raw: bytes, stride: int, colors: int) -> np.ndarray:
    """Undo PNG row predictors (a filter-type byte before each row of `stride` bytes; `colors` bytes a pixel)."""
    rows = np.frombuffer(raw, np.uint8).reshape(-1, stride + 1)
    out = np.zeros((len(rows), stride), np.int32)
    for r, row in enumerate(rows):
        kind, line = row[0], row[1:].astype(np.int32)
        prev = out[r - 1] if r else np.zeros(stride, np.int32)
        if kind == 0:
            cur = line
        elif kind == 1:
            cur = line.copy()
            for i in range(colors, stride):
                cur[i] = (cur[i] + cur[i - colors]) & 255
        elif kind == 2:
            cur = (line + prev) & 255
        elif kind == 3:
            cur = line.copy()
            for i in range(stride):
                left = cur[i - colors] if i >= colors else 0
                cur[i] = (cur[i] + (left + prev[i]) // 2) & 255
        elif kind == 4:
            cur = line.copy()
            for i in range(stride):
                a = cur[i - colors] if i >= colors else 0
                b, c = prev[i], prev[i - colors] if i >= colors else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        else:
            raise ValueError(f"PNG predictor type {kind}")
        out[r] = cur
    return out.astype(np.uint8)


def _image(obj: bytes, objs: dict[int, bytes]) -> np.ndarray:
    head, data = _stream(obj, objs)
    width = int(re.search(rb"/Width (\d+)", head).group(1))
    height = int(re.search(rb"/Height (\d+)", head).group(1))
    indexed = re.search(rb"/Indexed /DeviceRGB (\d+)\s*\((.*?)\)\s*\]", head, re.S)
    colors = 1 if indexed or b"/DeviceGray" in head else 3
    bits = re.search(rb"/BitsPerComponent (\d+)", head)
    bits = int(bits.group(1)) if bits else 8   # matplotlib packs palettes of <= 16 colours at 1, 2 or 4 bits
    stride = -(-width * colors * bits // 8)
    pixels = (_unpredict(data, stride, max(1, colors * bits // 8)) if b"/Predictor" in head
              else np.frombuffer(data, np.uint8)).reshape(height, stride)
    if bits < 8:   # unpack each byte's samples, most significant first
        shifts = np.arange(8 - bits, -1, -bits, dtype=np.uint8)
        pixels = ((pixels[..., None] >> shifts) & ((1 << bits) - 1)).reshape(height, -1)
    pixels = pixels[:, :width * colors].reshape(height, width, colors)
    if indexed:   # palette of RGB triples (PDF string escapes are rare in matplotlib's grey palettes)
        palette = np.frombuffer(indexed.group(2).replace(b"\\\\", b"\\")[:3 * (int(indexed.group(1)) + 1)],
                                np.uint8).reshape(-1, 3)
        return palette[pixels[..., 0].clip(0, len(palette) - 1)].mean(-1).astype(np.uint8)
    return pixels.mean(-1).astype(np.uint8)


def _objects(blob: bytes) -> dict[int, bytes]:
    """Every object by number, from the cross-reference table (a regex over the file could cut a binary stream
    at bytes that happen to spell `endobj`); each runs to the next object's offset."""
    start = int(re.search(rb"startxref\s+(\d+)", blob[-64:]).group(1))
    first, count = map(int, re.match(rb"xref\s+(\d+) (\d+)\s+", blob[start:]).groups())
    table = blob[start:].split(b"\n", 2)[2]
    offsets = {}
    for i, entry in enumerate(re.findall(rb"(\d{10}) \d{5} ([nf])", table)[:count]):
        if entry[1] == b"n":
            offsets[first + i] = int(entry[0])
    ends = sorted([*offsets.values(), start])
    objs = {}
    for number, offset in offsets.items():
        end = ends[ends.index(offset) + 1]
        body = _OBJ.match(blob, offset, end) or re.match(rb"(\d+) 0 obj(.*)", blob[offset:end], re.S)
        objs[number] = body.group(2)
    return objs


def read_pages(path: str | Path) -> list[Page]:
    """The pages of the PDF at `path`, in order."""
    blob = Path(path).read_bytes()
    objs = _objects(blob)
    catalog = next(v for v in objs.values() if b"/Type /Catalog" in v)
    pages_obj = objs[int(re.search(rb"/Pages " + _REF, catalog).group(1))]
    kids = [int(k) for k in re.findall(_REF, re.search(rb"/Kids \[(.*?)\]", pages_obj, re.S).group(1))]
    count = int(re.search(rb"/Count (\d+)", pages_obj).group(1))
    if count != len(kids):
        raise ValueError(f"/Count {count} but {len(kids)} kids")
    pages = []
    for kid in kids:
        page = objs[kid]
        _, content = _stream(objs[int(re.search(rb"/Contents " + _REF, page).group(1))], objs)
        text = content.decode("latin1")
        operators = collections.Counter(re.findall(r"(?<=\s)([A-Za-z*'\"]+)(?=\s)", f" {text} "))
        resources = objs[int(re.search(rb"/Resources " + _REF, page).group(1))]
        xobjects = {}
        ref = re.search(rb"/XObject " + _REF, resources)
        if ref:
            table = objs[int(ref.group(1))]
            xobjects = {name.decode(): int(num) for name, num in re.findall(rb"/(\w+) (\d+) 0 R", table)}
        drawn = re.findall(r"/(\w+) Do", text)
        images = [objs[xobjects[n]] for n in drawn if n in xobjects]   # also Form XObjects (plot markers)
        pages.append(Page(operators, [_image(obj, objs) for obj in images if b"/Subtype /Image" in obj]))
    return pages
