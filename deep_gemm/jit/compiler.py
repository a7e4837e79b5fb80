"""The two compiler back ends: NVRTC (default) and nvcc (``DG_JIT_USE_NVCC=1``). Both compile one CUDA C++
translation unit to a cubin for an explicit arch, so no GPU is needed. Each reports its identity (name + version) and
flags, which the cache key hashes; ``-I`` is added only at compile time so that the key never holds an absolute path."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from typing import List, Optional, Tuple

_ARCH = re.compile(r"^sm_(\d+)([af]?)$")
_SYMBOL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENTRY = re.compile(r"Compiling entry function '([^']+)'")


def is_symbol(kernel_name: str) -> bool:
    """True for the name of an extern "C" kernel, False for a C++ name expression."""
    return bool(_SYMBOL.match(kernel_name))


_BUILTIN_TYPES = {"void", "bool", "char", "short", "int", "long", "unsigned", "signed", "float", "double"}


def mangled_matches(expression: str, symbol: str) -> bool:
    """Whether an Itanium-mangled `symbol` spells every identifier and integer of a C++ name
    `expression` (identifiers as <length><name>, integers as L<type><value>E, true / false as Lb1E /
    Lb0E). A check of the one kernel nvcc compiled against the name asked for, not a demangler."""
    for token in re.findall(r"[A-Za-z_][A-Za-z0-9_]*|\d+", expression):
        if token in _BUILTIN_TYPES:
            continue
        if token in ("true", "false"):
            want = "Lb1E" if token == "true" else "Lb0E"
        elif token.isdigit():
            want = f"{token}E"
        else:
            want = f"{len(token)}{token}"
        if want not in symbol:
            return False
    return True


def entry_functions(log: str) -> List[str]:
    """The kernels ptxas compiled, in order, from its -v report."""
    return list(dict.fromkeys(_ENTRY.findall(log)))


class CompilationError(RuntimeError):
    """The compiler rejected a kernel: ``log`` is its full output, ``source_path`` the exact source it was given."""

    def __init__(self, message: str, log: str = "", source_path: str = ""):
        self.log = log
        self.source_path = source_path
        super().__init__(message)

    def __reduce__(self):
        # Keep the extra fields when the error crosses a process pool.
        return (type(self), (self.args[0], self.log, self.source_path))


def check_arch(arch: str) -> Tuple[str, str]:
    """Split 'sm_90a' into ('90', 'a'); raise ValueError on anything else."""
    m = _ARCH.match(arch) if isinstance(arch, str) else None
    if not m:
        raise ValueError(f"arch must look like 'sm_90a' or 'sm_90', got {arch!r}")
    return m.group(1), m.group(2)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _failure(what: str, log: str, source_path: str) -> CompilationError:
    return CompilationError(f"{what} failed for {source_path}\n"
                            f"(the source is kept there; open it to see the line numbers below)\n"
                            f"--- compiler log ---\n{log.rstrip()}", log=log, source_path=source_path)


class Compiler:
    """Interface of a back end."""
    name = ""

    @property
    def identity(self) -> str:
        """Name and exact version; part of the cache key."""
        raise NotImplementedError

    def flags(self, arch: str) -> List[str]:
        """Options that shape the cubin, without the include path."""
        raise NotImplementedError

    def compile(self, source: str, source_path: str, include_dir: str, arch: str,
                kernel_name: str) -> Tuple[bytes, str, str]:
        """Return (cubin, log, symbol), ``symbol`` being the kernel's name in the cubin (kernel_name for an extern
        "C" kernel, else the instantiation's mangled name). Raise CompilationError with the log on failure."""
        raise NotImplementedError


class NvrtcCompiler(Compiler):
    name = "nvrtc"

    def __init__(self, lineinfo: bool = False):
        self._lineinfo = lineinfo
        self._identity: Optional[str] = None

    @staticmethod
    def _nvrtc():
        try:
            from cuda.bindings import nvrtc
        except ImportError as e:
            raise RuntimeError("deep_gemm's GPU kernels need cuda-bindings and NVRTC: pip install 'deep_gemm[cu13]' "
                               "(CUDA 13 driver, R580+) or 'deep_gemm[cu12]' (CUDA 12), or set DG_JIT_USE_NVCC=1 to "
                               "use nvcc") from e
        return nvrtc

    @property
    def identity(self) -> str:
        if self._identity is None:
            nvrtc = self._nvrtc()
            try:
                err, major, minor = nvrtc.nvrtcVersion()
            except Exception as e:  # the bindings raise when libnvrtc can't be loaded
                raise RuntimeError(
                    "cannot load libnvrtc: install the NVRTC wheel matching cuda-bindings' "
                    "major version ('nvidia-cuda-nvrtc' for CUDA 13, "
                    f"'nvidia-cuda-nvrtc-cu12>=12.4' for CUDA 12: the cu13 / cu12 extras of deep_gemm), or set "
                    f"DG_JIT_USE_NVCC=1 ({e})") from e
            self._check(err, "nvrtcVersion")
            ident = f"nvrtc {major}.{minor}"
            # nvrtcVersion() is only major.minor and a patch release can change code generation: add the wheel version.
            wheel = _nvrtc_wheel_version(major)
            self._identity = f"{ident} ({wheel})" if wheel else ident
        return self._identity

    def flags(self, arch: str) -> List[str]:
        check_arch(arch)
        flags = [f"--gpu-architecture={arch}", "-std=c++17", "--ptxas-options=-v", "-default-device"]
        if self._lineinfo:
            flags.append("-lineinfo")
        return flags

    def _check(self, err, what: str) -> None:
        nvrtc = self._nvrtc()
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, msg = nvrtc.nvrtcGetErrorString(err)
            raise RuntimeError(f"{what} failed: {msg.decode(errors='replace')}")

    def compile(self, source, source_path, include_dir, arch, kernel_name):
        nvrtc = self._nvrtc()
        self.identity  # raises a clear error if libnvrtc is missing
        opts = [o.encode() for o in self.flags(arch) + [f"-I{include_dir}"]]
        # The program name shows in errors ("path(12): error ..."): use the real file, which the user can open.
        err, prog = nvrtc.nvrtcCreateProgram(source.encode(), source_path.encode(), 0, [], [])
        self._check(err, "nvrtcCreateProgram")
        expression = None if is_symbol(kernel_name) else kernel_name.encode()
        try:
            if expression is not None:   # a template instantiation: NVRTC tells its mangled name
                (err,) = nvrtc.nvrtcAddNameExpression(prog, expression)
                self._check(err, "nvrtcAddNameExpression")
            (result,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
            err, size = nvrtc.nvrtcGetProgramLogSize(prog)
            self._check(err, "nvrtcGetProgramLogSize")
            buf = b" " * size
            (err,) = nvrtc.nvrtcGetProgramLog(prog, buf)
            self._check(err, "nvrtcGetProgramLog")
            log = buf.rstrip(b"\x00").decode(errors="replace")
            if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
                raise _failure("NVRTC compilation", log, source_path)
            # A cubin for the exact arch, no PTX: the driver's PTX JIT (and its version check) never runs at load.
            err, size = nvrtc.nvrtcGetCUBINSize(prog)
            self._check(err, "nvrtcGetCUBINSize")
            cubin = b" " * size
            (err,) = nvrtc.nvrtcGetCUBIN(prog, cubin)
            self._check(err, "nvrtcGetCUBIN")
            symbol = kernel_name
            if expression is not None:
                err, lowered = nvrtc.nvrtcGetLoweredName(prog, expression)
                self._check(err, "nvrtcGetLoweredName")
                symbol = lowered.decode() if isinstance(lowered, bytes) else str(lowered)
        finally:
            nvrtc.nvrtcDestroyProgram(prog)
        return bytes(cubin), log, symbol


def _nvrtc_wheel_version(major: int) -> Optional[str]:
    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover - python < 3.8
        return None
    names = ["nvidia-cuda-nvrtc"] if major >= 13 else [f"nvidia-cuda-nvrtc-cu{major}"]
    for dist in names:
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def find_nvcc() -> str:
    """$DG_JIT_NVCC_COMPILER, else nvcc on PATH, else $CUDA_HOME/bin/nvcc."""
    explicit = os.environ.get("DG_JIT_NVCC_COMPILER")
    if explicit:
        if not os.path.isfile(explicit):
            raise RuntimeError(f"DG_JIT_NVCC_COMPILER={explicit!r} is not a file")
        return explicit
    found = shutil.which("nvcc")
    if found:
        return found
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda/bin/nvcc"
    raise RuntimeError("DG_JIT_USE_NVCC is set but nvcc was not found: set "
                       "DG_JIT_NVCC_COMPILER or CUDA_HOME, or put nvcc on PATH")


class NvccCompiler(Compiler):
    name = "nvcc"

    def __init__(self, path: str, lineinfo: bool = False):
        self.path = path
        self._lineinfo = lineinfo
        self._identity: Optional[str] = None

    @property
    def identity(self) -> str:
        if self._identity is None:
            try:
                out = subprocess.run([self.path, "--version"], capture_output=True, text=True, check=True).stdout
            except (OSError, subprocess.CalledProcessError) as e:
                raise RuntimeError(f"cannot run {self.path} --version: {e}") from e
            m = re.search(r"V(\d+\.\d+\.\d+)", out)
            short = f"nvcc {m.group(1)}" if m else "nvcc"
            # Hash the whole banner (build id included), show the short form.
            self._identity = f"{short} [{' '.join(out.split())}]"
        return self._identity

    def flags(self, arch: str) -> List[str]:
        number, suffix = check_arch(arch)
        flags = ["-cubin", f"-gencode=arch=compute_{number}{suffix},code=sm_{number}{suffix}",
                 "-std=c++17", "-O3", "-Xptxas", "-v"]
        if self._lineinfo:
            flags.append("-lineinfo")
        return flags

    def compile(self, source, source_path, include_dir, arch, kernel_name):
        # nvcc reads the file the caller already wrote; source is not re-read.
        with tempfile.TemporaryDirectory(prefix="deep_gemm-nvcc-") as tmp:
            out = os.path.join(tmp, "kernel.cubin")
            cmd = [self.path] + self.flags(arch) + [f"-I{include_dir}", "-o", out, source_path]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            log = (proc.stdout + proc.stderr)
            if proc.returncode != 0:
                raise _failure(f"nvcc (exit {proc.returncode}: {' '.join(cmd)})", log, source_path)
            with open(out, "rb") as f:
                cubin = f.read()
        if is_symbol(kernel_name):
            return cubin, log, kernel_name
        # A template instantiation: nvcc doesn't tell its mangled name, but ptxas -v names every entry function;
        # the translation unit's only one must carry every name and integer of the expression.
        entries = entry_functions(log)
        if len(entries) != 1 or not mangled_matches(kernel_name, entries[0]):
            raise _failure(f"nvcc: {kernel_name} must be the only kernel of its translation unit "
                           f"(ptxas compiled {', '.join(entries) or 'none'})", log, source_path)
        return cubin, log, entries[0]


_compilers: dict = {}


def get_compiler() -> Compiler:
    """The back end the environment asks for (read on every call, so tests and users may switch at run time);
    instances are reused so versions are asked once."""
    use_nvcc = _env_flag("DG_JIT_USE_NVCC")
    lineinfo = _env_flag("DG_JIT_WITH_LINEINFO")
    # Key on the raw settings so that finding nvcc (a PATH scan) happens once.
    where = tuple(os.environ.get(v) for v in ("DG_JIT_NVCC_COMPILER", "PATH", "CUDA_HOME",
                                              "CUDA_PATH")) if use_nvcc else None
    key = (use_nvcc, lineinfo, where)
    compiler = _compilers.get(key)
    if compiler is None:
        compiler = NvccCompiler(find_nvcc(), lineinfo) if use_nvcc else NvrtcCompiler(lineinfo)
        _compilers[key] = compiler
    return compiler
