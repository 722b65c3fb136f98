"""Cheap JPEG validity checks, so that no image that would stop a DALI pipeline reaches a shard."""
from __future__ import annotations

from typing import List, Optional, Set, Tuple

_SIGNATURES = {
    b"\x89PNG": "PNG",
    b"GIF8": "GIF",
    b"RIFF": "WEBP/RIFF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}
# SOF markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])


# Headers (SOI up to the end of the start-of-scan segment) that passed the marker walk. The walk's outcome
# depends only on those bytes, so an image that starts with one of them needs just the end-of-image check.
# Images of one source share a handful of headers (same quantization and Huffman tables): the few most
# recent ones are tried first with ``startswith`` (a memcmp), the rest are found by a set lookup. The bound
# keeps memory small on sources whose every header differs (then every image takes the full walk).
_GOOD_HEADERS: Set[bytes] = set()
_RECENT_HEADERS: List[bytes] = []
_MAX_GOOD_HEADERS = 4096
_MAX_RECENT = 4


def check_header(data: bytes) -> Optional[str]:
    """Walk the JPEG markers up to the start of scan; return a reason if the image is not a usable JPEG.

    Checks: SOI signature, well-formed segments, a frame header with non-zero size, a start of scan, and
    an end-of-image marker at the end (a cut-off download lacks it). Costs a few dozen byte reads, or a
    memcmp for a header seen before."""
    for head in _RECENT_HEADERS:
        if data.startswith(head):
            return _check_end(data)
    head = _known_header(data)
    if head is None:
        reason, header_end = _walk_markers(data)
        if reason is not None:
            return reason
        head = bytes(data[:header_end])
        if len(_GOOD_HEADERS) < _MAX_GOOD_HEADERS:
            _GOOD_HEADERS.add(head)
    _RECENT_HEADERS.insert(0, head)
    del _RECENT_HEADERS[_MAX_RECENT:]
    return _check_end(data)


def _known_header(data: bytes) -> Optional[bytes]:
    """The image's header if it is in ``_GOOD_HEADERS``."""
    sos = data.find(b"\xff\xda", 2)
    if sos < 0 or sos + 4 > len(data):
        return None
    # A guess at where the header ends; a wrong guess (an FF DA inside a table) only misses the memo.
    head = bytes(data[: sos + 2 + ((data[sos + 2] << 8) | data[sos + 3])])
    return head if head in _GOOD_HEADERS else None


def _check_end(data: bytes) -> Optional[str]:
    # The end-of-image marker should close the file; allow a little trailing padding.
    if data.rfind(b"\xff\xd9", max(0, len(data) - 32)) < 0:
        return "truncated JPEG (no end-of-image marker)"
    return None


def _walk_markers(data: bytes) -> Tuple[Optional[str], int]:
    """(reason, 0) for a bad header, or (None, end of the start-of-scan segment)."""
    n = len(data)
    if n < 4:
        return f"image too small ({n} bytes)", 0
    if data[:3] != b"\xff\xd8\xff":
        for sig, name in _SIGNATURES.items():
            if data.startswith(sig):
                return f"not a JPEG ({name} image)", 0
        return f"not a JPEG (starts with {data[:4].hex()})", 0
    pos, frame = 2, None
    while True:
        if pos + 4 > n:
            return "truncated JPEG header", 0
        if data[pos] != 0xFF:
            return f"corrupt JPEG header (no marker at byte {pos})", 0
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            return "truncated JPEG header", 0
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE:
            continue
        if marker == 0xD9:
            return "JPEG ends before any image data", 0
        if pos + 2 > n:
            return "truncated JPEG header", 0
        seg = (data[pos] << 8) | data[pos + 1]
        if seg < 2 or pos + seg > n:
            return "truncated JPEG header", 0
        if marker in _SOF:
            if seg < 8:
                return "corrupt JPEG frame header", 0
            h = (data[pos + 3] << 8) | data[pos + 4]
            w = (data[pos + 5] << 8) | data[pos + 6]
            if h == 0 or w == 0:
                return f"JPEG frame of size {w}x{h}", 0
            frame = (h, w)
        elif marker == 0xDA:
            if frame is None:
                return "JPEG has no frame header before its scan", 0
            return None, pos + seg
        pos += seg


def check_decode(data: bytes) -> Optional[str]:
    """Full decode with libjpeg-turbo in strict mode (corrupt entropy data is an error)."""
    reason = check_header(data)
    if reason:
        return reason
    try:
        import simplejpeg

        simplejpeg.decode_jpeg(data, strict=True)
    except ImportError:  # pragma: no cover - simplejpeg is a dependency; PIL as a fallback
        import io
        import warnings

        from PIL import Image

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                Image.open(io.BytesIO(data)).load()
        except Exception as e:  # noqa: BLE001 - any decoder complaint means a bad image
            return f"JPEG does not decode ({e})"
    except Exception as e:  # noqa: BLE001
        return f"JPEG does not decode ({e})"
    return None


CHECKS = {"header": check_header, "decode": check_decode}
