"""CPU tests of deep_gemm.jit: compile for sm_90a without a GPU, read ptxas'
report, and keep the disk cache correct under corruption, concurrency and
unwritable folders."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from deep_gemm import jit
from deep_gemm.jit import CompilationError, compile_kernel, precompile
from deep_gemm.jit import build as jit_build
from deep_gemm.jit import cache as jit_cache
from deep_gemm.jit import compiler as jit_compiler
from deep_gemm.jit.compiler import entry_functions, find_nvcc, is_symbol
from deep_gemm.jit.resources import parse_ptxas_report

REPO = Path(__file__).resolve().parents[1]

# A miniature of the GEMM's set-up: 3 warpgroups, setmaxnreg moving registers
# from the producer to the consumers (needs __launch_bounds__(..., 1)), and an
# mbarrier. No CUDA header, no stdint: NVRTC has neither.
PROBE = textwrap.dedent("""\
    extern "C" __global__ void __launch_bounds__(384, 1) jit_probe(float* out) {
        __shared__ __align__(8) unsigned long long bar;
        if (threadIdx.x == 0) {
            unsigned int addr = static_cast<unsigned int>(__cvta_generic_to_shared(&bar));
            asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(addr), "r"(1));
            asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        }
        __syncthreads();
        if (threadIdx.x < 128) {
            asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
        } else {
            asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
        }
        out[blockIdx.x * blockDim.x + threadIdx.x] = static_cast<float>(threadIdx.x);
    }
    """)

EM_CUDA = 190  # ELF e_machine of a cubin

# A C++ template kernel in a namespace, instantiated twice: compile_kernel takes the C++ name of
# one instantiation (a "name expression") and finds its mangled symbol.
TEMPLATE = textwrap.dedent("""\
    namespace jit_ns {
    template <int kScale, typename T>
    __global__ void __launch_bounds__(128, 1) scaled(T* out) {
        out[blockIdx.x * blockDim.x + threadIdx.x] = static_cast<T>(threadIdx.x * kScale);
    }
    }  // namespace jit_ns
    template __global__ void jit_ns::scaled<3, float>(float*);
    """)
TEMPLATE_TWO = TEMPLATE + "template __global__ void jit_ns::scaled<5, int>(int*);\n"


def _nvrtc_only(monkeypatch):
    monkeypatch.delenv("DG_JIT_USE_NVCC", raising=False)


def _forbid_compiling(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the compiler ran although the cache should have answered")
    monkeypatch.setattr(jit_build, "_build", fail)


def test_compiles_sm90a_without_gpu(tmp_cache_dir, monkeypatch):
    _nvrtc_only(monkeypatch)
    k = compile_kernel(PROBE, "jit_probe", arch="sm_90a", name="probe")
    assert k.cubin[:4] == b"\x7fELF"
    assert int.from_bytes(k.cubin[18:20], "little") == EM_CUDA
    r = k.resources
    assert r.registers > 0
    assert (r.spill_store_bytes, r.spill_load_bytes, r.stack_bytes) == (0, 0, 0)
    assert r.shared_bytes == 8  # the mbarrier
    assert not r.setmaxnreg_ignored, k.log
    assert not k.from_cache and k.compile_s > 0
    assert k.compiler.startswith("nvrtc ")
    assert len(k.key) == 64 and k.kernel_name == "jit_probe" and k.name == "probe"
    assert k.symbol == "jit_probe"  # an extern "C" kernel: its name is its symbol
    entry = Path(k.cache_dir)
    assert entry.parent.parent == tmp_cache_dir and entry.name == f"probe-{k.key[:16]}"
    assert Path(k.source_path).read_text() == PROBE
    assert (entry / "kernel.cubin").read_bytes() == k.cubin
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["kernel_name"] == "jit_probe" and meta["cubin_size"] == len(k.cubin)
    assert meta["format"] == jit_cache.FORMAT == 2 and meta["symbol"] == "jit_probe"
    assert "ptxas" in k.log


def test_setmaxnreg_ignored_is_reported(tmp_cache_dir, monkeypatch):
    _nvrtc_only(monkeypatch)
    source = PROBE.replace("__launch_bounds__(384, 1) ", "")
    k = compile_kernel(source, "jit_probe", name="no_bounds")
    assert k.resources.setmaxnreg_ignored
    assert any("C7508" in w for w in k.resources.warnings)


def test_compile_error_names_log_and_source(tmp_cache_dir, monkeypatch):
    _nvrtc_only(monkeypatch)
    bad = PROBE.replace("static_cast<float>(threadIdx.x)", "not_declared_anywhere")
    with pytest.raises(CompilationError) as info:
        compile_kernel(bad, "jit_probe", name="broken")
    err = info.value
    assert isinstance(err, RuntimeError)
    assert "not_declared_anywhere" in str(err) and "not_declared_anywhere" in err.log
    assert err.source_path in str(err)
    assert Path(err.source_path).read_text() == bad
    # A failed build leaves no meta.json behind, so nothing can load it later.
    assert not (Path(err.source_path).parent / "meta.json").exists()


def test_unknown_kernel_name_is_an_error(tmp_cache_dir, monkeypatch):
    _nvrtc_only(monkeypatch)
    with pytest.raises(CompilationError, match="no kernel named 'other_name'"):
        compile_kernel(PROBE, "other_name")


@pytest.mark.parametrize("kwargs, match", [
    (dict(source="", kernel_name="k"), "source"),
    (dict(source=PROBE, kernel_name="two\nlines"), "kernel_name"),
    (dict(source=PROBE, kernel_name="   "), "kernel_name"),
    (dict(source=PROBE, kernel_name=None), "kernel_name"),
    (dict(source=PROBE, kernel_name="jit_probe", arch="sm90"), "arch"),
    (dict(source=PROBE, kernel_name="jit_probe", name=""), "name"),
])
def test_bad_arguments(tmp_cache_dir, kwargs, match):
    source, kernel_name = kwargs.pop("source"), kwargs.pop("kernel_name")
    with pytest.raises(ValueError, match=match):
        compile_kernel(source, kernel_name, **kwargs)


def test_memo_and_disk_cache_hit(tmp_cache_dir, monkeypatch):
    _nvrtc_only(monkeypatch)
    first = compile_kernel(PROBE, "jit_probe", name="probe")
    assert compile_kernel(PROBE, "jit_probe", name="probe") is first  # in-process memo
    jit.clear_memory_cache()  # as if a new process started
    _forbid_compiling(monkeypatch)
    again = compile_kernel(PROBE, "jit_probe", name="probe")
    assert again.from_cache and again.compile_s == 0.0
    assert again.cubin == first.cubin and again.key == first.key
    assert again.resources == first.resources and again.log == first.log
    assert again.symbol == first.symbol == "jit_probe"


def test_debug_prints_times_and_path(tmp_cache_dir, monkeypatch, capsys):
    _nvrtc_only(monkeypatch)
    monkeypatch.setenv("DG_JIT_DEBUG", "1")
    k = compile_kernel(PROBE, "jit_probe", name="probe")
    jit.clear_memory_cache()
    compile_kernel(PROBE, "jit_probe", name="probe")
    err = capsys.readouterr().err
    assert "compiled probe" in err and "cache hit probe" in err and k.cache_dir in err


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif how == "flip":  # same size, ELF magic intact: only the checksum can tell
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
    elif how == "delete":
        path.unlink()
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["truncate", "empty", "garbage", "flip", "delete"])
def test_corrupt_cubin_is_rebuilt(tmp_cache_dir, monkeypatch, how):
    _nvrtc_only(monkeypatch)
    good = compile_kernel(PROBE, "jit_probe", name="probe")
    _corrupt(Path(good.cache_dir) / "kernel.cubin", how)
    jit.clear_memory_cache()
    rebuilt = compile_kernel(PROBE, "jit_probe", name="probe")
    assert not rebuilt.from_cache and rebuilt.cubin == good.cubin
    jit.clear_memory_cache()
    assert compile_kernel(PROBE, "jit_probe", name="probe").from_cache  # repaired on disk


@pytest.mark.parametrize("content", [
    None, b"", b"{not json", b"[1, 2]", b"\xff\xfe\x00",
    "truncate", "no_resources", "bad_resources", "other_key", "no_symbol", "old_format",
])
def test_corrupt_meta_is_rebuilt(tmp_cache_dir, monkeypatch, content):
    _nvrtc_only(monkeypatch)
    good = compile_kernel(PROBE, "jit_probe", name="probe")
    meta_path = Path(good.cache_dir) / "meta.json"
    meta = json.loads(meta_path.read_text())
    if content is None:
        meta_path.unlink()
    elif content == "truncate":
        meta_path.write_bytes(meta_path.read_bytes()[:40])
    elif content == "no_resources":
        del meta["resources"]
        meta_path.write_text(json.dumps(meta))
    elif content == "bad_resources":
        meta["resources"]["registers"] = "many"
        meta_path.write_text(json.dumps(meta))
    elif content == "other_key":  # a 16-hex-digit prefix collision must not be trusted
        meta["key"] = "0" * 64
        meta_path.write_text(json.dumps(meta))
    elif content == "no_symbol":  # an entry that cannot say which function to load
        del meta["symbol"]
        meta_path.write_text(json.dumps(meta))
    elif content == "old_format":  # FORMAT 1 entries had no symbol
        meta["format"] = 1
        meta_path.write_text(json.dumps(meta))
    else:
        meta_path.write_bytes(content)
    jit.clear_memory_cache()
    rebuilt = compile_kernel(PROBE, "jit_probe", name="probe")
    assert not rebuilt.from_cache and rebuilt.cubin == good.cubin
    jit.clear_memory_cache()
    assert compile_kernel(PROBE, "jit_probe", name="probe").from_cache


def test_key_is_content_only(tmp_path, monkeypatch):
    """Same key from another cache folder and from a moved kernels folder: no
    absolute path enters the key. A changed header changes it."""
    _nvrtc_only(monkeypatch)
    header = 'inline __device__ float jit_scale() { return 2.0f; }\n'
    source = '#include "jit_test_scale.cuh"\n' + PROBE.replace(
        "static_cast<float>(threadIdx.x)", "jit_scale()")
    keys = []
    for i in range(2):
        kernels = tmp_path / f"install{i}" / "kernels"
        kernels.mkdir(parents=True)
        (kernels / "jit_test_scale.cuh").write_text(header)
        monkeypatch.setattr(jit_build, "KERNELS_DIR", kernels)
        monkeypatch.setenv("DG_JIT_CACHE_DIR", str(tmp_path / f"cache{i}"))
        monkeypatch.chdir(tmp_path / f"install{i}")
        jit.clear_memory_cache()
        k = compile_kernel(source, "jit_probe", name="include")  # -I reaches the header
        assert not k.from_cache
        keys.append(k.key)
    assert keys[0] == keys[1]

    changed = tmp_path / "changed" / "kernels"
    changed.mkdir(parents=True)
    (changed / "jit_test_scale.cuh").write_text(header.replace("2.0f", "3.0f"))
    monkeypatch.setattr(jit_build, "KERNELS_DIR", changed)
    jit.clear_memory_cache()
    assert compile_kernel(source, "jit_probe", name="include").key != keys[0]


def test_key_depends_on_arch_and_kernel_name(tmp_cache_dir, monkeypatch):
    _nvrtc_only(monkeypatch)
    a = compile_kernel(PROBE, "jit_probe", arch="sm_90a").key
    twin = PROBE + PROBE.replace("jit_probe", "jit_probe2")
    b = compile_kernel(twin, "jit_probe").key
    c = compile_kernel(twin, "jit_probe2").key
    assert len({a, b, c}) == 3


_CHILD = textwrap.dedent("""\
    import os, sys, time
    from pathlib import Path
    from deep_gemm.jit import compile_kernel
    from deep_gemm.jit.compiler import get_compiler
    get_compiler().identity  # load libnvrtc now, so that the compiles start together
    ready, go, source = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    ready.write_text("ready")
    deadline = time.time() + 120
    while not go.exists():  # start compiling together with the others
        if time.time() > deadline:
            sys.exit("never told to go")
        time.sleep(0.002)
    k = compile_kernel(source.read_text(), "jit_probe", name="race")
    print(k.key, k.from_cache)
    """)


# Serving engines start 8 data-parallel processes at once; CI has 2 cores, so 4 race here.
NUM_RACERS = 4


def test_processes_racing_compile_once(tmp_cache_dir, tmp_path, monkeypatch):
    _nvrtc_only(monkeypatch)
    env = dict(os.environ, DG_JIT_DEBUG="1",
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get(
                   "PYTHONPATH")] if p]))
    go, source = tmp_path / "go", tmp_path / "probe.cu"
    source.write_text(PROBE)
    procs = []
    for i in range(NUM_RACERS):
        ready = tmp_path / f"ready{i}"
        p = subprocess.Popen([sys.executable, "-c", _CHILD, str(ready), str(go), str(source)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env, cwd=str(tmp_path))
        procs.append((p, ready))
    deadline = time.time() + 120
    while not all(ready.exists() for _, ready in procs):
        if any(p.poll() is not None for p, _ in procs) or time.time() > deadline:
            break
        time.sleep(0.01)
    go.write_text("go")
    outputs = []
    for p, _ in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        outputs.append((out, err))
    keys = {out.split()[0] for out, _ in outputs}
    assert len(keys) == 1
    stderr = "".join(err for _, err in outputs)
    assert stderr.count("] compiled race") == 1, stderr
    assert stderr.count("] cache hit race") == NUM_RACERS - 1, stderr
    assert sorted(out.split()[1] for out, _ in outputs) == ["False"] + ["True"] * (NUM_RACERS - 1)


def test_lock_holder_rechecks_the_cache(tmp_cache_dir, monkeypatch):
    """While we wait for the lock another process may finish the entry: the
    waiter must load it, not compile again."""
    _nvrtc_only(monkeypatch)
    real_locked = jit_cache.locked

    class OtherProcessFinishesFirst:
        def __init__(self, entry):
            self.entry = entry

        def __enter__(self):
            monkeypatch.setattr(jit_cache, "locked", real_locked)
            jit.clear_memory_cache()
            compile_kernel(PROBE, "jit_probe", name="probe")  # "the other process"
            jit.clear_memory_cache()
            _forbid_compiling(monkeypatch)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(jit_cache, "locked", OtherProcessFinishesFirst)
    assert compile_kernel(PROBE, "jit_probe", name="probe").from_cache


def _expect_one_warning(record) -> None:
    messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "DG_JIT_CACHE_DIR" in messages[0], messages


def test_unusable_cache_dir_falls_back_to_memory(tmp_path, monkeypatch):
    """A cache path under a regular file can't be created, even by root."""
    _nvrtc_only(monkeypatch)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DG_JIT_CACHE_DIR", str(blocker / "cache"))
    jit.clear_memory_cache()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        k = compile_kernel(PROBE, "jit_probe", name="probe")
        compile_kernel(PROBE.replace("jit_probe", "jit_probe_b"), "jit_probe_b", name="other")
    _expect_one_warning(record)  # once per process, not once per kernel
    assert k.cubin[:4] == b"\x7fELF" and not k.from_cache and k.cache_dir is None
    assert Path(k.source_path).read_text() == PROBE  # still there for the user to read


def test_read_only_cache_dir_falls_back(tmp_path, monkeypatch):
    _nvrtc_only(monkeypatch)
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o555)
    try:
        probe = root / "probe"
        try:
            probe.mkdir()
        except OSError:
            pass
        else:
            probe.rmdir()
            pytest.skip("running with rights that write into a 0o555 folder (root)")
        monkeypatch.setenv("DG_JIT_CACHE_DIR", str(root))
        jit.clear_memory_cache()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            k = compile_kernel(PROBE, "jit_probe", name="probe")
        _expect_one_warning(record)
        assert k.cache_dir is None and k.cubin[:4] == b"\x7fELF"
    finally:
        root.chmod(0o755)


def test_read_only_cache_with_entry_still_loads(tmp_cache_dir, monkeypatch):
    _nvrtc_only(monkeypatch)
    compile_kernel(PROBE, "jit_probe", name="probe")
    jit.clear_memory_cache()

    def no_lock(entry):
        raise PermissionError("read-only file system")
    monkeypatch.setattr(jit_cache, "locked", no_lock)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        k = compile_kernel(PROBE, "jit_probe", name="probe")
    assert k.from_cache and not record  # reading needs no lock and no write


def test_disk_full_while_storing(tmp_cache_dir, monkeypatch):
    _nvrtc_only(monkeypatch)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(jit_cache, "store", full)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        k = compile_kernel(PROBE, "jit_probe", name="probe")
    _expect_one_warning(record)
    assert k.cache_dir is None and k.cubin[:4] == b"\x7fELF"
    assert not (tmp_cache_dir / "cache" / f"probe-{k.key[:16]}" / "meta.json").exists()


def _nvcc_or_skip() -> str:
    try:
        return find_nvcc()
    except RuntimeError as e:
        pytest.skip(f"nvcc not found: {e}")


def test_nvcc_compiles_the_same_kernel(tmp_cache_dir, monkeypatch):
    _nvcc_or_skip()
    monkeypatch.delenv("DG_JIT_USE_NVCC", raising=False)
    via_nvrtc = compile_kernel(PROBE, "jit_probe", name="probe")
    monkeypatch.setenv("DG_JIT_USE_NVCC", "1")
    k = compile_kernel(PROBE, "jit_probe", name="probe")
    assert k.compiler.startswith("nvcc ") and k.key != via_nvrtc.key
    assert k.cubin[:4] == b"\x7fELF" and not k.from_cache
    assert k.resources.registers > 0 and not k.resources.spills
    assert not k.resources.setmaxnreg_ignored

    bad = PROBE.replace("static_cast<float>(threadIdx.x)", "not_declared_anywhere")
    with pytest.raises(CompilationError) as info:
        compile_kernel(bad, "jit_probe", name="broken")
    assert "not_declared_anywhere" in info.value.log and info.value.source_path in str(info.value)


def test_precompile_in_parallel(tmp_cache_dir, monkeypatch, capsys):
    _nvrtc_only(monkeypatch)
    other = PROBE.replace("jit_probe", "jit_probe_b")
    jobs = [("a", PROBE, "jit_probe", "sm_90a"), ("b", other, "jit_probe_b", "sm_90a"),
            ("a", PROBE, "jit_probe", "sm_90a")]
    kernels = precompile(jobs, workers=2)
    assert [k.name for k in kernels] == ["a", "b", "a"] and kernels[0] is kernels[2]
    assert all(k.cubin[:4] == b"\x7fELF" for k in kernels)
    assert "[2/2]" in capsys.readouterr().err
    # The parent's memo now holds them: no compile, no pool.
    _forbid_compiling(monkeypatch)
    assert compile_kernel(other, "jit_probe_b", name="b") is kernels[1]
    jit.clear_memory_cache()
    again = precompile(jobs, progress=False)  # all from disk, no worker started
    assert all(k.from_cache for k in again) and not capsys.readouterr().err


def test_precompile_reports_failures_after_the_rest(tmp_cache_dir, monkeypatch):
    _nvrtc_only(monkeypatch)
    bad = PROBE.replace("static_cast<float>(threadIdx.x)", "not_declared_anywhere")
    jobs = [("bad", bad, "jit_probe", "sm_90a"), ("good", PROBE, "jit_probe", "sm_90a")]
    with pytest.raises(CompilationError, match="1 of 2 kernels failed"):
        precompile(jobs, workers=1, progress=False)
    jit.clear_memory_cache()
    _forbid_compiling(monkeypatch)
    assert compile_kernel(PROBE, "jit_probe", name="good").from_cache
    with pytest.raises(TypeError):
        precompile([("only", "three", "items")])


def test_parse_picks_the_named_entry():
    log = textwrap.dedent("""\
        ptxas info    : 0 bytes gmem
        ptxas info    : Compiling entry function 'first' for 'sm_90a'
        ptxas info    : Function properties for first
            16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
        ptxas info    : Used 255 registers, 16 bytes smem, 384 bytes cmem[0]
        ptxas info    : Compiling entry function 'second' for 'sm_90a'
        ptxas info    : Function properties for helper
        ptxas         .     32 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Function properties for second
        ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 40 registers, used 1 barriers
        ptxas warning : Registers are spilled to local memory in function 'first'
        """)
    first = parse_ptxas_report(log, "first")
    assert (first.registers, first.spill_store_bytes, first.spill_load_bytes,
            first.stack_bytes, first.shared_bytes) == (255, 8, 4, 16, 16)
    second = parse_ptxas_report(log, "second")
    assert (second.registers, second.stack_bytes, second.shared_bytes) == (40, 0, 0)
    assert not second.spills and len(second.warnings) == 1
    assert parse_ptxas_report(log, "third") is None


def test_serialised_wgmmas_are_reported():
    # ptxas' C7514 (the log line of a pipelined kernel over an odd number of K blocks before
    # the odd count was hidden from ptxas): the kernel runs, but every wgmma waits for the one before it.
    log = textwrap.dedent("""\
        ptxas info    : (C7514) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non wgmma instructions reading accumulator registers of  a wgmma between start and end of the pipeline stage in the function 'k' in line 0
        ptxas info    : Compiling entry function 'k' for 'sm_90a'
        ptxas info    : Function properties for k
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 168 registers
        """)
    r = parse_ptxas_report(log, "k")
    assert r.wgmma_serialized and not r.setmaxnreg_ignored and not r.spills
    without_warning = "".join(log.splitlines(True)[1:])
    assert not parse_ptxas_report(without_warning, "k").wgmma_serialized
    from deep_gemm.jit.precompile_cli import _problem
    record = {"spill_bytes": 0, "stack_bytes": 0, "setmaxnreg_ignored": False, "wgmma_serialized": True}
    assert "C7514" in _problem(record)


# ---- C++ name expressions (template kernels) ------------------------------------------------------
def test_is_symbol():
    for name in ("jit_probe", "_k", "K9"):
        assert is_symbol(name), name
    for name in ("jit_ns::scaled<3, float>", "deep_gemm::gemm_kernel<deep_gemm::GemmConfig<1, 2>>", "k<1>",
                 "9k", "a b", ""):
        assert not is_symbol(name), name


def test_entry_functions_lists_each_kernel_once_in_order():
    log = textwrap.dedent("""\
        ptxas info    : Compiling entry function '_Z1aPf' for 'sm_90a'
        ptxas info    : Function properties for _Z1aPf
        ptxas info    : Compiling entry function 'b' for 'sm_90a'
        ptxas info    : Compiling entry function '_Z1aPf' for 'sm_90a'
        """)
    assert entry_functions(log) == ["_Z1aPf", "b"]
    assert entry_functions("") == []


def test_template_kernel_by_name_expression(tmp_cache_dir, monkeypatch):
    _nvrtc_only(monkeypatch)
    k = compile_kernel(TEMPLATE, "jit_ns::scaled<3, float>", name="template")
    assert k.kernel_name == "jit_ns::scaled<3, float>"
    assert k.symbol.startswith("_Z") and "scaled" in k.symbol and k.symbol != k.kernel_name
    assert entry_functions(k.log) == [k.symbol]
    assert parse_ptxas_report(k.log, k.symbol) == k.resources and k.resources.registers > 0
    meta = json.loads((Path(k.cache_dir) / "meta.json").read_text())
    assert meta["symbol"] == k.symbol and meta["kernel_name"] == k.kernel_name
    # Read back from disk, as by a new process: the mangled symbol comes back with the cubin.
    jit.clear_memory_cache()
    _forbid_compiling(monkeypatch)
    again = compile_kernel(TEMPLATE, "jit_ns::scaled<3, float>", name="template")
    assert again.from_cache and again.symbol == k.symbol and again.cubin == k.cubin


def test_two_instantiations_in_one_translation_unit(tmp_cache_dir, monkeypatch):
    _nvrtc_only(monkeypatch)
    first = compile_kernel(TEMPLATE_TWO, "jit_ns::scaled<3, float>", name="two")
    second = compile_kernel(TEMPLATE_TWO, "jit_ns::scaled<5, int>", name="two")
    entries = entry_functions(first.log)
    assert len(entries) == 2 and len(set(entries)) == 2
    assert first.symbol in entries and second.symbol in entries and first.symbol != second.symbol
    assert first.key != second.key   # the name is part of the key: each its own cache entry
    # Each kernel's resources are its own block of the report.
    assert first.resources == parse_ptxas_report(first.log, first.symbol)
    assert second.resources == parse_ptxas_report(second.log, second.symbol)


def test_extern_c_kernel_keeps_its_name_as_symbol(tmp_cache_dir, monkeypatch):
    _nvrtc_only(monkeypatch)
    source = PROBE + TEMPLATE   # a C symbol beside a template in one unit
    k = compile_kernel(source, "jit_probe", name="mixed")
    assert k.symbol == "jit_probe" and "jit_probe" in entry_functions(k.log)
    assert len(entry_functions(k.log)) == 2
    jit.clear_memory_cache()
    again = compile_kernel(source, "jit_probe", name="mixed")
    assert again.from_cache and again.symbol == "jit_probe"


def test_unknown_name_expression_is_an_error(tmp_cache_dir, monkeypatch):
    _nvrtc_only(monkeypatch)
    with pytest.raises(CompilationError):
        compile_kernel(TEMPLATE, "jit_ns::not_there<3, float>", name="missing")


def test_compiler_returns_the_symbol(tmp_path, monkeypatch):
    # compiler.compile(...) -> (cubin, log, symbol), straight from the back end.
    _nvrtc_only(monkeypatch)
    compiler = jit_compiler.get_compiler()
    cubin, log, symbol = compiler.compile(TEMPLATE, str(tmp_path / "t.cu"), str(jit_build.KERNELS_DIR), "sm_90a",
                                          "jit_ns::scaled<3, float>")
    assert cubin[:4] == b"\x7fELF" and symbol.startswith("_Z") and entry_functions(log) == [symbol]
    cubin, log, symbol = compiler.compile(PROBE, str(tmp_path / "p.cu"), str(jit_build.KERNELS_DIR), "sm_90a",
                                          "jit_probe")
    assert symbol == "jit_probe"


def test_nvcc_template_kernel(tmp_cache_dir, monkeypatch, tmp_path):
    _nvcc_or_skip()
    monkeypatch.setenv("DG_JIT_USE_NVCC", "1")
    k = compile_kernel(TEMPLATE, "jit_ns::scaled<3, float>", name="template")
    assert k.compiler.startswith("nvcc ") and k.symbol.startswith("_Z") and entry_functions(k.log) == [k.symbol]
    # The same mangled name as NVRTC's nvrtcGetLoweredName.
    monkeypatch.delenv("DG_JIT_USE_NVCC")
    assert compile_kernel(TEMPLATE, "jit_ns::scaled<3, float>", name="template").symbol == k.symbol
    # nvcc cannot tell which of several kernels a name expression means: refused, not guessed.
    monkeypatch.setenv("DG_JIT_USE_NVCC", "1")
    with pytest.raises(CompilationError, match="only kernel of its translation unit"):
        compile_kernel(TEMPLATE_TWO, "jit_ns::scaled<3, float>", name="two")
