"""On-disk kernel cache: one folder per key, per-key lock, atomic writes, verified reads. Layout under
``$DG_JIT_CACHE_DIR`` (default ``~/.deep_gemm``)::

    cache/<name>-<key[:16]>/kernel.cu     the exact source compiled
    cache/<name>-<key[:16]>/kernel.cubin
    cache/<name>-<key[:16]>/meta.json     written last: a valid meta means a complete entry
    cache/<name>-<key[:16]>.lock          flock'ed while the entry is built

When several processes (data-parallel ranks) ask for the same kernel at once, the first takes the lock and compiles,
the rest wait, re-check and load. Nothing read from disk is trusted until its size, sha256 and ELF magic match
meta.json, so a truncated or garbled entry is rebuilt, never loaded."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import uuid
import warnings
from pathlib import Path
from typing import Iterator, Optional

FORMAT = 2
ELF_MAGIC = b"\x7fELF"
SOURCE_FILE = "kernel.cu"
CUBIN_FILE = "kernel.cubin"
META_FILE = "meta.json"

_warned_unwritable = False


def cache_root() -> Path:
    """``$DG_JIT_CACHE_DIR`` or ``~/.deep_gemm``; read on every call."""
    return Path(os.environ.get("DG_JIT_CACHE_DIR") or "~/.deep_gemm").expanduser()


def entry_dir(root: Path, name: str, key: str) -> Path:
    # The label is for humans browsing the folder; the key makes it unique.
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80].lstrip(".") or "kernel"
    return root / "cache" / f"{safe}-{key[:16]}"


def load(entry: Path, key: str) -> Optional[dict]:
    """Meta (cubin under ``"cubin"``) if the entry is complete and intact, else None; never raises for a bad entry."""
    try:
        with open(entry / META_FILE, "rb") as f:
            meta = json.loads(f.read().decode())
        with open(entry / CUBIN_FILE, "rb") as f:
            cubin = f.read()
    except (OSError, ValueError):  # ValueError covers bad JSON and bad UTF-8
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("key") != key:
        return None
    if (meta.get("cubin_size") != len(cubin) or not cubin.startswith(ELF_MAGIC)
            or meta.get("cubin_sha256") != hashlib.sha256(cubin).hexdigest()):
        return None
    meta = dict(meta)
    meta["cubin"] = cubin
    return meta


@contextlib.contextmanager
def locked(entry: Path) -> Iterator[None]:
    """Exclusive lock for one key; OSError if the cache folder or lock file can't be made (read-only, full disk)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    # Beside the entry and never deleted: removing a lock file while another process waits on it breaks exclusion.
    fd = os.open(str(entry) + ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def atomic_write(path: Path, data: bytes) -> None:
    """Write a unique temp file in the same folder, then rename it over ``path``: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_source(entry: Path, source: str) -> Path:
    """Put the source in the entry before compiling, so a failing compile can point the user at it."""
    entry.mkdir(parents=True, exist_ok=True)
    path = entry / SOURCE_FILE
    atomic_write(path, source.encode())
    return path


def store(entry: Path, key: str, cubin: bytes, meta: dict) -> None:
    """Write the cubin, then meta.json last (the entry's commit point)."""
    atomic_write(entry / CUBIN_FILE, cubin)
    full = dict(meta, format=FORMAT, key=key, cubin_size=len(cubin), cubin_sha256=hashlib.sha256(cubin).hexdigest())
    atomic_write(entry / META_FILE, json.dumps(full, indent=1, sort_keys=True).encode())


def warn_unwritable(root: Path, error: BaseException) -> None:
    """One warning per process: a serving process may compile hundreds of kernels."""
    global _warned_unwritable
    if _warned_unwritable:
        return
    _warned_unwritable = True
    warnings.warn(f"deep_gemm: the JIT cache folder {root} cannot be written ({error}); kernels "
                  f"are compiled in memory and not kept. Set DG_JIT_CACHE_DIR to a writable folder.",
                  RuntimeWarning, stacklevel=3)


def reset_warning() -> None:
    global _warned_unwritable
    _warned_unwritable = False
