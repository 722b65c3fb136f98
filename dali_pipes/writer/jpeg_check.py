"""Cheap JPEG validity checks, so that no image that would stop a DALI pipeline reaches a shard."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

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
_NO_SIZE = (0, 0)


DEFAULT_MAX_SIDE = 8192  # pixels a side; the competition's images are 180x180
VERIFY_MODES = ("header", "decode")
# A full decode costs about 3.4x the CPU of the header walk in a repack (BENCHMARKS.md), a few CPU-minutes
# for the whole competition set, and catches corrupt scan data that the walk cannot see.
DEFAULT_VERIFY = "decode"

# Headers (SOI up to the end of the start-of-scan segment) that passed the marker walk, with the longer side
# of their frame. The walk's outcome depends only on those bytes, so an image that starts with one of them
# needs just the size and end-of-image checks. Images of one source share a handful of headers (same
# quantization and Huffman tables): the few most recent ones are tried first with ``startswith`` (a memcmp),
# the rest are found by a dict lookup. The bound keeps memory small on sources whose every header differs
# (then every image takes the full walk).
_GOOD_HEADERS: Dict[bytes, Tuple[int, int]] = {}
_RECENT_HEADERS: List[Tuple[bytes, Tuple[int, int]]] = []
_MAX_GOOD_HEADERS = 4096
_MAX_RECENT = 4


def check_header(data: bytes, max_side: int = DEFAULT_MAX_SIDE) -> Optional[str]:
    """Walk the JPEG markers up to the start of scan; return a reason if the image is not a usable JPEG.

    Checks: SOI signature, well-formed segments, a frame header with a non-zero size of at most ``max_side``
    pixels a side (a small file can claim 16000x16000 and make the decoder allocate gigabytes), a start of
    scan, and an end-of-image marker after the scan data (a cut-off download lacks it; bytes after the marker,
    as phones and upload tools append, are allowed: every decoder ignores them). Costs a few dozen byte
    reads, or a memcmp for a header seen before."""
    return header_info(data, max_side)[0]


def header_info(data: bytes, max_side: int = DEFAULT_MAX_SIDE) -> Tuple[Optional[str], Tuple[int, int]]:
    """``(check_header's reason, (width, height) of the frame)``; the size is (0, 0) when the header does not
    parse. The frame's size is the stored one, before any EXIF orientation."""
    for head, size in _RECENT_HEADERS:
        if data.startswith(head):
            return _check_size(size, max_side) or _check_end(data, len(head)), size
    head = _known_header(data)
    if head is None:
        reason, header_end, size = _walk_markers(data)
        if reason is not None:
            return reason, size
        head = bytes(data[:header_end])
        if len(_GOOD_HEADERS) < _MAX_GOOD_HEADERS:
            _GOOD_HEADERS[head] = size
    else:
        size = _GOOD_HEADERS[head]
    _RECENT_HEADERS.insert(0, (head, size))
    del _RECENT_HEADERS[_MAX_RECENT:]
    return _check_size(size, max_side) or _check_end(data, len(head)), size


def _known_header(data: bytes) -> Optional[bytes]:
    """The image's header if it is in ``_GOOD_HEADERS``."""
    sos = data.find(b"\xff\xda", 2)
    if sos < 0 or sos + 4 > len(data):
        return None
    # A guess at where the header ends; a wrong guess (an FF DA inside a table) only misses the memo.
    head = bytes(data[: sos + 2 + ((data[sos + 2] << 8) | data[sos + 3])])
    return head if head in _GOOD_HEADERS else None


def _check_size(size: Tuple[int, int], max_side: int) -> Optional[str]:
    width, height = size
    if width > max_side or height > max_side:
        return (f"JPEG of {width}x{height} pixels is larger than {max_side} pixels a side "
                "(a decompression bomb or a mistake; raise --max-side to keep such images)")
    return None


def _check_end(data: bytes, header_end: int) -> Optional[str]:
    """An end-of-image marker after the header. Scan data cannot hold the bytes FF D9 (an FF there is
    followed by 00 or a restart marker), so the first FF D9 after the header ends the image; whatever follows
    it is a trailer that decoders ignore. The common case, the marker among the last bytes, is one short
    search; a trailer costs one scan of the image."""
    n = len(data)
    if data.rfind(b"\xff\xd9", max(header_end, n - 32)) >= 0 or data.find(b"\xff\xd9", header_end) >= 0:
        return None
    return "truncated JPEG (no end-of-image marker)"


def _walk_markers(data: bytes) -> Tuple[Optional[str], int, Tuple[int, int]]:
    """(reason, 0, _) for a bad header, or (None, end of the start-of-scan segment, (width, height))."""
    n = len(data)
    if n < 4:
        return f"image too small ({n} bytes)", 0, _NO_SIZE
    if data[:3] != b"\xff\xd8\xff":
        for sig, name in _SIGNATURES.items():
            if data.startswith(sig):
                return f"not a JPEG ({name} image)", 0, _NO_SIZE
        return f"not a JPEG (starts with {data[:4].hex()})", 0, _NO_SIZE
    pos, frame = 2, None
    while True:
        if pos + 4 > n:
            return "truncated JPEG header", 0, _NO_SIZE
        if data[pos] != 0xFF:
            return f"corrupt JPEG header (no marker at byte {pos})", 0, _NO_SIZE
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            return "truncated JPEG header", 0, _NO_SIZE
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE:
            continue
        if marker == 0xD9:
            return "JPEG ends before any image data", 0, _NO_SIZE
        if pos + 2 > n:
            return "truncated JPEG header", 0, _NO_SIZE
        seg = (data[pos] << 8) | data[pos + 1]
        if seg < 2 or pos + seg > n:
            return "truncated JPEG header", 0, _NO_SIZE
        if marker in _SOF:
            if seg < 8:
                return "corrupt JPEG frame header", 0, _NO_SIZE
            h = (data[pos + 3] << 8) | data[pos + 4]
            w = (data[pos + 5] << 8) | data[pos + 6]
            if h == 0 or w == 0:
                return f"JPEG frame of size {w}x{h}", 0, _NO_SIZE
            frame = (h, w)
        elif marker == 0xDA:
            if frame is None:
                return "JPEG has no frame header before its scan", 0, _NO_SIZE
            return None, pos + seg, (frame[1], frame[0])
        pos += seg


def check_decode(data: bytes, max_side: int = DEFAULT_MAX_SIDE) -> Optional[str]:
    """The header checks, then a full decode with libjpeg-turbo in strict mode (corrupt entropy data is an
    error, where the header walk sees nothing wrong)."""
    return decode_info(data, max_side)[0]


def decode_info(data: bytes, max_side: int = DEFAULT_MAX_SIDE) -> Tuple[Optional[str], Tuple[int, int]]:
    """``(check_decode's reason, (width, height) of the frame)``, as ``header_info``."""
    reason, size = header_info(data, max_side)
    if reason:
        return reason, size
    return _decode_reason(data), size


def _decode_reason(data: bytes) -> Optional[str]:
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


CHECKS = {"header": header_info, "decode": decode_info}


def make_check(verify: str, max_side: int = DEFAULT_MAX_SIDE
               ) -> Callable[[bytes], Tuple[Optional[str], Tuple[int, int]]]:
    """The check of ``--verify`` (header or decode) with the ``--max-side`` limit: image bytes -> ``(a reason
    or None, (width, height) of the JPEG frame)``."""
    check = CHECKS[verify]
    return lambda data: check(data, max_side)
