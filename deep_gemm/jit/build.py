"""compile_kernel: source -> cubin, through the in-process memo and the disk cache."""
from __future__ import annotations

import hashlib
import os
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

from . import cache
from .compiler import CompilationError, Compiler, check_arch, get_compiler
from .resources import KernelResources, parse_ptxas_report

# Headers that every kernel source may #include (passed as -I).
KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

_memo: Dict[tuple, "CompiledKernel"] = {}
_headers_digest: Dict[str, bytes] = {}
_memo_lock = threading.Lock()
_fallback_dir: Optional[str] = None


@dataclass(frozen=True)
class CompiledKernel:
    """A compiled kernel, ready for ``cuModuleLoadData(cubin)`` and
    ``cuModuleGetFunction(kernel_name)``.

    ``key`` is the content hash the cache uses; ``source_path`` is the
    ``kernel.cu`` that was compiled (in the cache entry, or a temp folder when
    the cache can't be written); ``compile_s`` is 0.0 when ``from_cache``.
    ``cache_dir`` is the entry folder, or None for an in-memory build.
    """
    name: str
    kernel_name: str
    cubin: bytes = field(repr=False)
    key: str
    resources: KernelResources
    compile_s: float
    from_cache: bool
    source_path: str
    arch: str = "sm_90a"
    compiler: str = ""
    log: str = field(default="", repr=False)
    cache_dir: Optional[str] = None


def _debug() -> bool:
    return os.environ.get("DG_JIT_DEBUG", "").strip() not in ("", "0")


def _say(msg: str) -> None:
    print(f"[deep_gemm.jit pid {os.getpid()}] {msg}", file=sys.stderr, flush=True)


def headers_digest(kernels_dir: Path) -> bytes:
    """sha256 over every file under ``kernels_dir``: relative name + content, in
    sorted order. Computed once per process and folder (headers don't change
    while a program runs). Bytecode caches and hidden files (editor swap
    files) are skipped; absolute paths never enter the hash."""
    cached = _headers_digest.get(str(kernels_dir))
    if cached is not None:
        return cached
    h = hashlib.sha256()
    if kernels_dir.is_dir():
        files = sorted(p for p in kernels_dir.rglob("*") if p.is_file()
                       and not any(part.startswith(".") or part == "__pycache__"
                                   for part in p.relative_to(kernels_dir).parts))
        for p in files:
            rel = p.relative_to(kernels_dir).as_posix().encode()
            data = p.read_bytes()
            h.update(len(rel).to_bytes(8, "little") + rel)
            h.update(len(data).to_bytes(8, "little") + data)
    digest = h.digest()
    _headers_digest[str(kernels_dir)] = digest
    return digest


def cache_key(source: str, kernel_name: str, arch: str, compiler: Compiler,
              kernels_dir: Path) -> str:
    """Content-only key: same inputs on another machine or install path give
    the same key, so a moved install or a shared cache is reused."""
    h = hashlib.sha256()
    for part in (f"deep_gemm-jit-{cache.FORMAT}", source, kernel_name, arch,
                 compiler.identity, "\0".join(compiler.flags(arch))):
        data = part.encode()
        h.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: no ambiguity
    h.update(headers_digest(kernels_dir))
    return h.hexdigest()


def clear_memory_cache() -> None:
    """Forget what this process remembers: compiled kernels, the header hash and
    the 'cache not writable' warning. The disk cache is untouched."""
    with _memo_lock:
        _memo.clear()
        _headers_digest.clear()
    cache.reset_warning()


def _check_inputs(source, kernel_name, arch, name) -> None:
    if not isinstance(source, str) or not source.strip():
        raise ValueError("source must be a non-empty string of CUDA C++")
    if not isinstance(kernel_name, str) or not _IDENTIFIER.match(kernel_name):
        raise ValueError(f"kernel_name must be the extern \"C\" symbol of the kernel, "
                         f"got {kernel_name!r}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    check_arch(arch)


def _fallback_source_path(name: str, key: str, source: str) -> str:
    """Where the source goes when the cache can't be written: one temp folder
    per process, so a failing compile still names a file the user can open."""
    global _fallback_dir
    try:
        if _fallback_dir is None:
            _fallback_dir = tempfile.mkdtemp(prefix="deep_gemm-jit-")
        path = cache.entry_dir(Path(_fallback_dir), name, key).name + ".cu"
        full = os.path.join(_fallback_dir, path)
        with open(full, "wb") as f:
            f.write(source.encode())
        return full
    except OSError:
        return f"<memory>/{name}-{key[:16]}.cu"  # NVRTC needs no file; nvcc will fail clearly


def _build(compiler: Compiler, source: str, source_path: str, kernel_name: str,
           arch: str) -> tuple:
    """Run the compiler; return (cubin, log, resources, seconds)."""
    t0 = time.perf_counter()
    try:
        cubin, log = compiler.compile(source, source_path, str(KERNELS_DIR), arch)
    except OSError as e:
        # Re-raised as RuntimeError so that callers can read any OSError as a
        # cache-folder problem.
        raise RuntimeError(f"running {compiler.name} failed: {e}") from e
    seconds = time.perf_counter() - t0
    if not cubin.startswith(cache.ELF_MAGIC):
        raise CompilationError(f"{compiler.name} returned something that is not a cubin "
                               f"for {source_path}", log=log, source_path=source_path)
    resources = parse_ptxas_report(log, kernel_name)
    if resources is None:
        raise CompilationError(
            f"no kernel named {kernel_name!r} in {source_path}: ptxas reported no entry "
            f"function by that name (is it declared extern \"C\" __global__?)\n"
            f"--- compiler log ---\n{log.rstrip()}", log=log, source_path=source_path)
    return cubin, log, resources, seconds


def _summary(r: KernelResources) -> str:
    text = (f"{r.registers} registers, spills {r.spill_store_bytes}/{r.spill_load_bytes} B, "
            f"stack {r.stack_bytes} B, static smem {r.shared_bytes} B")
    if r.warnings:
        text += f", {len(r.warnings)} warning(s)"
    return text


@dataclass(frozen=True)
class _Job:
    """One compile_kernel call, resolved: everything the steps below share."""
    source: str
    kernel_name: str
    arch: str
    name: str
    compiler: Compiler
    key: str
    root: Path
    entry: Path


def _from_disk(job: _Job, t0: float) -> Optional[CompiledKernel]:
    """The cached kernel if its entry is complete and intact, else None."""
    meta = cache.load(job.entry, job.key)
    if meta is None or meta.get("kernel_name") != job.kernel_name:
        return None
    try:
        # Resources come from meta.json; a meta that can't give them is corrupt.
        resources = KernelResources.from_dict(meta["resources"])
    except (KeyError, TypeError, ValueError):
        return None
    if _debug():
        _say(f"cache hit {job.name} ({job.kernel_name}) in "
             f"{(time.perf_counter() - t0) * 1e3:.1f} ms: {job.entry}")
    return CompiledKernel(
        name=job.name, kernel_name=job.kernel_name, cubin=meta["cubin"], key=job.key,
        resources=resources, compile_s=0.0, from_cache=True,
        source_path=str(job.entry / cache.SOURCE_FILE), arch=job.arch,
        compiler=str(meta.get("compiler", "")), log=str(meta.get("log", "")),
        cache_dir=str(job.entry))


def _build_into_cache(job: _Job) -> CompiledKernel:
    """Called with the entry's lock held. OSError from here means the cache
    folder can't be written (the compiler's own OSErrors are converted)."""
    source_path = str(cache.write_source(job.entry, job.source))
    cubin, log, resources, seconds = _build(job.compiler, job.source, source_path,
                                            job.kernel_name, job.arch)
    cache_dir: Optional[str] = str(job.entry)
    try:
        cache.store(job.entry, job.key, cubin, {
            "name": job.name, "kernel_name": job.kernel_name, "arch": job.arch,
            "compiler": job.compiler.identity, "flags": job.compiler.flags(job.arch),
            "compile_s": round(seconds, 4), "resources": resources.to_dict(), "log": log,
            "pid": os.getpid(), "created": time.time()})
    except OSError as e:  # e.g. the disk filled up after the source was written
        cache.warn_unwritable(job.root, e)
        cache_dir = None
    if _debug():
        _say(f"compiled {job.name} ({job.kernel_name}, {job.arch}) with "
             f"{job.compiler.identity} in {seconds:.3f} s: {_summary(resources)}; "
             f"{cache_dir or 'not cached'}")
    return CompiledKernel(
        name=job.name, kernel_name=job.kernel_name, cubin=cubin, key=job.key,
        resources=resources, compile_s=seconds, from_cache=False, source_path=source_path,
        arch=job.arch, compiler=job.compiler.identity, log=log, cache_dir=cache_dir)


def _build_in_memory(job: _Job) -> CompiledKernel:
    source_path = _fallback_source_path(job.name, job.key, job.source)
    cubin, log, resources, seconds = _build(job.compiler, job.source, source_path,
                                            job.kernel_name, job.arch)
    if _debug():
        _say(f"compiled {job.name} ({job.kernel_name}, {job.arch}) with "
             f"{job.compiler.identity} in {seconds:.3f} s: {_summary(resources)}; not cached")
    return CompiledKernel(
        name=job.name, kernel_name=job.kernel_name, cubin=cubin, key=job.key,
        resources=resources, compile_s=seconds, from_cache=False, source_path=source_path,
        arch=job.arch, compiler=job.compiler.identity, log=log, cache_dir=None)


def _resolve(source: str, kernel_name: str, arch: str, name: str) -> tuple:
    """Check inputs and pick the compiler; return (memo_key, compiler)."""
    _check_inputs(source, kernel_name, arch, name)
    compiler = get_compiler()
    memo_key = (source, kernel_name, arch, name, compiler.identity,
                tuple(compiler.flags(arch)), str(KERNELS_DIR))
    return memo_key, compiler


def _job(source: str, kernel_name: str, arch: str, name: str, compiler: Compiler) -> _Job:
    key = cache_key(source, kernel_name, arch, compiler, KERNELS_DIR)
    root = cache.cache_root()
    return _Job(source, kernel_name, arch, name, compiler, key, root,
                cache.entry_dir(root, name, key))


def _remember(memo_key: tuple, kernel: CompiledKernel) -> CompiledKernel:
    with _memo_lock:
        return _memo.setdefault(memo_key, kernel)


def compile_kernel(source: str, kernel_name: str, *, arch: str = "sm_90a",
                   name: str = "kernel") -> CompiledKernel:
    """Compile one CUDA C++ translation unit to a cubin for ``arch``, or take it
    from the disk cache.

    ``source`` may ``#include`` headers of ``deep_gemm/kernels/`` and must not
    include CUDA headers (NVRTC has none). ``kernel_name`` is the kernel's
    ``extern "C"`` symbol; ``name`` is a label for logs and cache folders.
    No GPU is needed. Raises CompilationError (a RuntimeError) with the
    compiler log and the path of the compiled source when compilation fails.
    Repeated calls with the same inputs return the same object.
    """
    memo_key, compiler = _resolve(source, kernel_name, arch, name)
    kernel = _memo.get(memo_key)
    if kernel is not None:
        return kernel
    job = _job(source, kernel_name, arch, name, compiler)
    t0 = time.perf_counter()
    kernel = _from_disk(job, t0)
    if kernel is None:
        try:
            with cache.locked(job.entry):
                # Another process may have built the entry while we waited.
                kernel = _from_disk(job, t0) or _build_into_cache(job)
        except OSError as e:
            cache.warn_unwritable(job.root, e)
            kernel = _build_in_memory(job)
    return _remember(memo_key, kernel)


def find_cached(source: str, kernel_name: str, *, arch: str = "sm_90a",
                name: str = "kernel") -> Optional[CompiledKernel]:
    """Like compile_kernel, but return None instead of compiling."""
    memo_key, compiler = _resolve(source, kernel_name, arch, name)
    kernel = _memo.get(memo_key)
    if kernel is None:
        kernel = _from_disk(_job(source, kernel_name, arch, name, compiler), time.perf_counter())
        if kernel is not None:
            kernel = _remember(memo_key, kernel)
    return kernel


def remember(source: str, kernel: CompiledKernel) -> CompiledKernel:
    """Put a kernel built in another process (precompile's workers) in this
    process's memo; return the memo's copy."""
    memo_key, _ = _resolve(source, kernel.kernel_name, kernel.arch, kernel.name)
    return _remember(memo_key, kernel)
