"""Small file helpers every part of the project uses: atomic writes, CSV text, the progress line.

Atomic writes: the data goes to a temporary file beside the target (``.NAME.XXXX.tmp``), is fsynced, then
renamed over the target, so a crash at any moment leaves the old file or the new one, never a torn one.
Imports nothing heavy (no torch, no pymongo): the reading and the writing side both use it.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import functools
import os
import signal
import sys
import tempfile
import threading
import time
from typing import Callable, Iterator, List, Optional

TMP_SUFFIX = ".tmp"  # every temporary file of an atomic write ends so; stale ones are safe to delete


def temp_path_for(path: str) -> str:
    """A fresh temporary file in ``path``'s directory (created empty, named ``.NAME.XXXX.tmp``)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=TMP_SUFFIX, dir=d)
    os.close(fd)
    return tmp


def temp_target(name: str) -> Optional[str]:
    """The file name a temporary of ``temp_path_for`` (``.NAME.XXXX.tmp``) stands for; None for other names."""
    if not (name.startswith(".") and name.endswith(TMP_SUFFIX)):
        return None
    target, dot, _ = name[1:-len(TMP_SUFFIX)].rpartition(".")
    return target if dot and target else None


def fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (best effort: some file systems refuse a directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path to write with any library (``np.save``, ``savefig``, ``shutil.copyfile``); it replaces
    ``path`` when the block ends without error, and is removed on an error (the old ``path`` stays)."""
    tmp = temp_path_for(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", **kw):
    """An open file (``"wb"`` or ``"w"``) whose content replaces ``path`` when the block ends without error."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kw) as fh:
            yield fh


def atomic_write_text(path: str, text: str) -> None:
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        f.write(text)


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def csv_text(header: List[str], rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


class CsvRows:
    """Rows appended to an open CSV file as ``csv_text`` formats them, each ``write`` flushed to the file."""

    def __init__(self, f, header: List[str]):
        self._f, self._w, self.rows = f, csv.writer(f, lineterminator="\n"), 0
        self._w.writerow(header)

    def write(self, rows) -> None:
        rows = list(rows)
        self._w.writerows(rows)
        self._f.flush()
        self.rows += len(rows)


@contextlib.contextmanager
def atomic_csv(path: str, header: List[str]) -> Iterator[CsvRows]:
    """``csv_text``'s file written a block of rows at a time (``CsvRows.write``), so that millions of rows are
    never all in memory; it replaces ``path`` when the block ends without error, as ``atomic_open``."""
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        yield CsvRows(f, header)


# ---- interruption ---------------------------------------------------------------------------------
class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C (SIGINT) so that ``finally`` blocks and atomic writes remove their
    temporaries; SIGTERM's default action ends the process without running them."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def interruptible(tool: str) -> Callable:
    """Decorate a command line's ``main``: SIGTERM raises ``Interrupted`` (the temporaries are removed on the
    way out), and an interrupt ends with one line and exit status 128 + the signal (130 for Ctrl-C)."""
    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kw):
            in_main = threading.current_thread() is threading.main_thread()
            old = signal.signal(signal.SIGTERM, _raise_interrupted) if in_main else None
            try:
                return main(*args, **kw)
            except KeyboardInterrupt as e:
                signum = getattr(e, "signum", signal.SIGINT)
                print(f"{tool}: interrupted ({signal.Signals(signum).name}); its temporary files are removed",
                      file=sys.stderr)
                return 128 + signum
            finally:
                if in_main:
                    signal.signal(signal.SIGTERM, old)
        return run
    return wrap


# ---- the progress line --------------------------------------------------------------------------
def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """One progress line on stderr: ``LABEL: done/total UNIT  rate UNIT/s  [extra]  ETA h:mm:ss``.

    On a terminal the line is redrawn every 0.5 s; in a log file one line every 10 s, so logs stay short.
    ``update(done)`` is cheap to call often."""

    def __init__(self, label: str, total: int, unit: str, enabled: bool = True, stream=None):
        self.label, self.total, self.unit, self.enabled = label, total, unit, enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = self.last = time.time()

    def update(self, done: int, extra: str = "", force: bool = False) -> Optional[str]:
        now = time.time()
        if not self.enabled or (not force and now - self.last < (0.5 if self.tty else 10.0)):
            return None
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        line = (f"{self.label}: {done:,}/{self.total:,} {self.unit}  {rate:,.0f} {self.unit}/s  "
                + (f"{extra}  " if extra else "") + f"ETA {format_eta(eta)}")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=self.stream, flush=True)
        return line

    def finish(self) -> None:
        if self.enabled and self.tty:
            print(file=self.stream)
