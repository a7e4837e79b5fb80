"""compile_kernel: source -> cubin, through the in-process memo and the disk cache."""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Optional

from . import cache
from .compiler import CompilationError, Compiler, check_arch, get_compiler
from .resources import KernelResources, parse_ptxas_report

# Headers that every kernel source may #include (passed as -I).
KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"

_memo: Dict[tuple, "CompiledKernel"] = {}
_headers_digest: Dict[str, bytes] = {}
_memo_lock = threading.Lock()
_fallback_dir: Optional[str] = None


@dataclass(frozen=True)
class CompiledKernel:
    """A compiled kernel, ready for ``cuModuleLoadData(cubin)`` and ``cuModuleGetFunction(symbol)``. ``kernel_name`` is
    what the caller asked for: an extern "C" symbol, or the C++ name of a template instantiation, whose mangled name is
    ``symbol``. ``key`` is the cache's content hash; ``source_path`` the compiled ``kernel.cu`` (in the cache entry, or
    a temp folder when the cache can't be written); ``compile_s`` is 0.0 when ``from_cache``; ``cache_dir`` the entry
    folder, or None for an in-memory build."""
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
    symbol: str = ""


def _debug() -> bool:
    return os.environ.get("DG_JIT_DEBUG", "").strip() not in ("", "0")


def _say(msg: str) -> None:
    print(f"[deep_gemm.jit pid {os.getpid()}] {msg}", file=sys.stderr, flush=True)


def headers_digest(kernels_dir: Path) -> bytes:
    """sha256 over every file under ``kernels_dir`` (relative name + content, sorted), once per process and folder.
    Bytecode caches and hidden files (editor swap files) are skipped; absolute paths never enter the hash."""
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


def cache_key(source: str, kernel_name: str, arch: str, compiler: Compiler, kernels_dir: Path) -> str:
    """Content only, no paths: a moved install, or a cache shared between machines, gets the same keys."""
    h = hashlib.sha256()
    for part in (f"deep_gemm-jit-{cache.FORMAT}", source, kernel_name, arch,
                 compiler.identity, "\0".join(compiler.flags(arch))):
        data = part.encode()
        h.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: no ambiguity
    h.update(headers_digest(kernels_dir))
    return h.hexdigest()


def clear_memory_cache() -> None:
    """Forget this process's compiled kernels, header hash and 'cache not writable' warning; not the disk cache."""
    with _memo_lock:
        _memo.clear()
        _headers_digest.clear()
    cache.reset_warning()


def _check_inputs(source, kernel_name, arch, name) -> None:
    if not isinstance(source, str) or not source.strip():
        raise ValueError("source must be a non-empty string of CUDA C++")
    if not isinstance(kernel_name, str) or not kernel_name.strip() or "\n" in kernel_name:
        raise ValueError(f"kernel_name must be the kernel's extern \"C\" symbol or the C++ name of a template "
                         f"instantiation, got {kernel_name!r}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    check_arch(arch)


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


def _fallback_source_path(job: _Job) -> str:
    """Source file when the cache can't be written: one temp folder per process, so a failing compile names a file."""
    global _fallback_dir
    try:
        if _fallback_dir is None:
            _fallback_dir = tempfile.mkdtemp(prefix="deep_gemm-jit-")
        full = os.path.join(_fallback_dir, cache.entry_dir(Path(_fallback_dir), job.name, job.key).name + ".cu")
        with open(full, "wb") as f:
            f.write(job.source.encode())
        return full
    except OSError:
        return f"<memory>/{job.name}-{job.key[:16]}.cu"  # NVRTC needs no file; nvcc will fail clearly


def _build(job: _Job, source_path: str, cache_dir: Optional[str]) -> CompiledKernel:
    """Run the compiler on the job's source (already written at source_path)."""
    t0 = time.perf_counter()
    try:
        cubin, log, symbol = job.compiler.compile(job.source, source_path, str(KERNELS_DIR), job.arch, job.kernel_name)
    except OSError as e:
        # Re-raised as RuntimeError so that callers can read any OSError as a cache-folder problem.
        raise RuntimeError(f"running {job.compiler.name} failed: {e}") from e
    seconds = time.perf_counter() - t0
    if not cubin.startswith(cache.ELF_MAGIC):
        raise CompilationError(f"{job.compiler.name} returned something that is not a cubin for {source_path}",
                               log=log, source_path=source_path)
    resources = parse_ptxas_report(log, symbol)
    if resources is None:
        raise CompilationError(
            f"no kernel named {job.kernel_name!r} in {source_path}: ptxas reported no entry function by that "
            f"name (is it declared extern \"C\" __global__, or instantiated?)\n--- compiler log ---\n{log.rstrip()}",
            log=log, source_path=source_path)
    return CompiledKernel(name=job.name, kernel_name=job.kernel_name, cubin=cubin, key=job.key,
                          resources=resources, compile_s=seconds, from_cache=False, source_path=source_path,
                          arch=job.arch, compiler=job.compiler.identity, log=log, cache_dir=cache_dir, symbol=symbol)


def _from_disk(job: _Job, t0: float) -> Optional[CompiledKernel]:
    """The cached kernel if its entry is complete and intact, else None."""
    meta = cache.load(job.entry, job.key)
    if meta is None or meta.get("kernel_name") != job.kernel_name or not isinstance(meta.get("symbol"), str):
        return None
    try:  # resources come from meta.json; a meta that can't give them is corrupt
        resources = KernelResources.from_dict(meta["resources"])
    except (KeyError, TypeError, ValueError):
        return None
    if _debug():
        _say(f"cache hit {job.name} in {(time.perf_counter() - t0) * 1e3:.1f} ms: {job.entry}")
    return CompiledKernel(
        name=job.name, kernel_name=job.kernel_name, cubin=meta["cubin"], key=job.key, resources=resources,
        compile_s=0.0, from_cache=True, source_path=str(job.entry / cache.SOURCE_FILE), arch=job.arch,
        compiler=str(meta.get("compiler", "")), log=str(meta.get("log", "")), cache_dir=str(job.entry),
        symbol=meta["symbol"])


def _build_into_cache(job: _Job) -> CompiledKernel:
    """Called with the entry's lock held. An OSError from here means the cache folder can't be written (the
    compiler's own OSErrors are converted)."""
    kernel = _build(job, str(cache.write_source(job.entry, job.source)), str(job.entry))
    try:
        cache.store(job.entry, job.key, kernel.cubin, {
            "name": job.name, "kernel_name": job.kernel_name, "symbol": kernel.symbol, "arch": job.arch,
            "compiler": job.compiler.identity, "flags": job.compiler.flags(job.arch),
            "compile_s": round(kernel.compile_s, 4), "resources": kernel.resources.to_dict(), "log": kernel.log,
            "pid": os.getpid(), "created": time.time()})
    except OSError as e:  # e.g. the disk filled up after the source was written
        cache.warn_unwritable(job.root, e)
        kernel = replace(kernel, cache_dir=None)
    return kernel


def _resolve(source: str, kernel_name: str, arch: str, name: str) -> tuple:
    _check_inputs(source, kernel_name, arch, name)
    compiler = get_compiler()
    memo_key = (source, kernel_name, arch, name, compiler.identity, tuple(compiler.flags(arch)), str(KERNELS_DIR))
    return memo_key, compiler


def _job(source: str, kernel_name: str, arch: str, name: str, compiler: Compiler) -> _Job:
    key = cache_key(source, kernel_name, arch, compiler, KERNELS_DIR)
    root = cache.cache_root()
    return _Job(source, kernel_name, arch, name, compiler, key, root, cache.entry_dir(root, name, key))


def _remember(memo_key: tuple, kernel: CompiledKernel) -> CompiledKernel:
    with _memo_lock:
        return _memo.setdefault(memo_key, kernel)


def compile_kernel(source: str, kernel_name: str, *, arch: str = "sm_90a", name: str = "kernel") -> CompiledKernel:
    """Compile one CUDA C++ translation unit to a cubin for ``arch`` (no GPU needed), or take it from the disk cache.

    ``source`` may ``#include`` headers of ``deep_gemm/kernels/`` but no CUDA headers (NVRTC has none). ``kernel_name``
    is the kernel's ``extern "C"`` symbol, or the C++ name of a template kernel the source instantiates; ``name`` is a
    label for logs and cache folders. Raises CompilationError (a RuntimeError) with the compiler log and the compiled
    source's path on failure. Repeated calls with the same inputs return the same object."""
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
            kernel = _build(job, _fallback_source_path(job), None)
        if _debug() and not kernel.from_cache:
            r = kernel.resources
            _say(f"compiled {job.name} with {compiler.identity} in {kernel.compile_s:.3f} s: {r.registers} registers, "
                 f"spills {r.spill_store_bytes}/{r.spill_load_bytes} B, stack {r.stack_bytes} B; "
                 f"{kernel.cache_dir or 'not cached'}")
    return _remember(memo_key, kernel)


def find_cached(source: str, kernel_name: str, *, arch: str = "sm_90a", name: str = "kernel") -> Optional[CompiledKernel]:
    """Like compile_kernel, but return None instead of compiling."""
    memo_key, compiler = _resolve(source, kernel_name, arch, name)
    kernel = _memo.get(memo_key)
    if kernel is None:
        kernel = _from_disk(_job(source, kernel_name, arch, name, compiler), time.perf_counter())
        if kernel is not None:
            kernel = _remember(memo_key, kernel)
    return kernel


def remember(source: str, kernel: CompiledKernel) -> CompiledKernel:
    """Put a kernel built in another process (precompile's workers) in this process's memo; return the memo's copy."""
    memo_key, _ = _resolve(source, kernel.kernel_name, kernel.arch, kernel.name)
    return _remember(memo_key, kernel)
