"""The window decoder, a DALI CPU operator of this project (``window_decode.cc``): built once with the C++
compiler, libjpeg-turbo's headers and DALI's, then loaded into DALI as ``fn.window_decode``.

``python -m dali_pipes.native`` builds it (``make install`` runs that) and prints where it is, or why it
could not be built (exit 1). ``window_decoder()`` loads it, building it first where it is missing (about 7 s
on one core; a file lock keeps ranks of one machine from building it twice). Where it cannot be had, the
dali-cpu loader runs its whole-picture graph instead and says why (``pipelines.graph_name``).

The library lives in ``$DALI_PIPES_NATIVE_DIR``, else in ``build/`` beside this file where that is writable,
else in ``~/.cache/dali_pipes``; its name carries a hash of the source, DALI's version and the compiler
flags, so a changed source or another DALI gets a build of its own. ``$CXX`` names the compiler (default
``g++``); the CUDA headers that DALI's headers include are looked for in ``$CUDA_HOME``, ``/usr/local/cuda*``
and the ``nvidia-*`` wheels (``_cuda_includes``).
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
from typing import List, Optional, Tuple

from ..fileio import atomic_path

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "window_decode.cc")
_loaded: Optional[Tuple[bool, str]] = None  # (loaded, path or the reason it is not)


class BuildError(RuntimeError):
    pass


# The CUDA headers that DALI's headers include (none of CUDA is called): the runtime's, the compiler's crt/
# and CCCL's nv/. A CUDA toolkit has all three; pip spreads them over three wheels.
_CUDA_HEADERS = {"cuda_runtime_api.h": "nvidia-cuda-runtime-cu12", "crt/host_config.h": "nvidia-cuda-nvcc-cu12",
                 "nv/target": "nvidia-cuda-cccl-cu12"}
_TOOLKITS = "/usr/local/cuda*/include"


def _cuda_includes() -> List[str]:
    """Include directories that hold ``_CUDA_HEADERS``: a toolkit's (``$CUDA_HOME``, ``/usr/local/cuda*``),
    else those of the ``nvidia-*`` wheels; BuildError names the wheels to install where some are missing."""
    import site

    def has(d: str, h: str) -> bool:
        return os.path.isfile(os.path.join(d, h))

    toolkits = [os.path.join(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    toolkits += sorted(glob.glob(_TOOLKITS), reverse=True)
    for d in toolkits:
        if all(has(d, h) for h in _CUDA_HEADERS):
            return [d]
    wheels = []
    for sp in site.getsitepackages() + [site.getusersitepackages()] + sys.path:
        wheels += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include")), reverse=True)
    found = {h: next((d for d in wheels if has(d, h)), None) for h in _CUDA_HEADERS}
    missing = [h for h, d in found.items() if d is None]
    if missing:
        raise BuildError(f"CUDA headers that DALI's headers include are missing ({', '.join(missing)}): set "
                         f"CUDA_HOME to a CUDA toolkit, or pip install {' '.join(_CUDA_HEADERS[h] for h in missing)}")
    return list(dict.fromkeys(found.values()))


def _command(out: str) -> List[str]:
    import nvidia.dali.sysconfig as dsys

    cxx = shlex.split(os.environ.get("CXX") or "g++")
    simd = ["-mssse3"] if platform.machine() in ("x86_64", "AMD64") else []  # the mirror's byte shuffle
    return (cxx + ["-std=c++20", "-O2", "-shared", "-fPIC", "-w", SOURCE, "-o", out] + simd
            + [f"-I{d}" for d in _cuda_includes()]
            + dsys.get_compile_flags() + dsys.get_link_flags() + ["-ljpeg"])


def library_dir() -> str:
    """Where the built library goes (see the module's doc)."""
    if os.environ.get("DALI_PIPES_NATIVE_DIR"):
        return os.environ["DALI_PIPES_NATIVE_DIR"]
    here = os.path.join(os.path.dirname(SOURCE), "build")
    parent = os.path.dirname(here)
    if os.access(here if os.path.isdir(here) else parent, os.W_OK):
        return here
    return os.path.join(os.path.expanduser("~"), ".cache", "dali_pipes")


def library_path() -> str:
    """The library's file for this source, this DALI and these flags (built or not)."""
    import nvidia.dali as dali

    key = hashlib.sha256()
    with open(SOURCE, "rb") as f:
        key.update(f.read())
    key.update(dali.__version__.encode())
    key.update((os.environ.get("CXX") or "g++").encode())
    return os.path.join(library_dir(), f"window_decode-{key.hexdigest()[:16]}.so")


def build() -> str:
    """Build the library where it is missing and return its path; BuildError says why it cannot be."""
    path = library_path()
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another rank may be building it: wait, then take its build
        if os.path.isfile(path):
            return path
        with atomic_path(path) as tmp:
            cmd = _command(tmp)
            if shutil.which(cmd[0]) is None:
                raise BuildError(f"no C++ compiler ({cmd[0]!r}; set CXX, or apt-get install g++)")
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                lines = [ln for ln in p.stderr.splitlines() if "error" in ln] or p.stderr.splitlines()[-3:]
                hint = (" (libjpeg-turbo's headers are missing: apt-get install libjpeg-dev)"
                        if "jpeglib.h" in p.stderr else "")
                raise BuildError(f"{cmd[0]} failed{hint}: {' | '.join(lines[:3])}")
    return path


def window_decoder() -> Tuple[bool, str]:
    """``(True, library path)`` once ``fn.window_decode`` is loaded into DALI, or ``(False, why not)``.
    Builds the library where it is missing; the answer is kept for the process."""
    global _loaded
    if _loaded is None:
        try:
            path = build()
            from nvidia.dali import plugin_manager

            plugin_manager.load_library(path)
            _loaded = (True, path)
        except (BuildError, OSError, RuntimeError) as e:
            _loaded = (False, str(e))
    return _loaded


def main() -> int:
    ok, what = window_decoder()
    print(f"window decoder: {what}" if ok else f"window decoder NOT built: {what}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
