"""CPU tests of how the package is put together: the host's description of the kernel
(deep_gemm/config.py: KernelConfig, GEMM_PARAMS) agrees with the C++ one (kernels/gemm.cuh:
GemmConfig, GemmParams), the generated source checks the parameter block against the struct, the
launch packs it as described, and the Python modules form no import cycle."""
from __future__ import annotations

import ast
import dataclasses
import re
import struct
from pathlib import Path

import pytest

from deep_gemm import config as cfg
from deep_gemm.config import GEMM_PARAMS, I32, MAP, PTR, KernelConfig, k_grouped_params, param_layout

PACKAGE = Path(cfg.__file__).resolve().parent
GEMM_CUH = PACKAGE / "kernels" / "gemm.cuh"


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


# ---- KernelConfig <-> deep_gemm::GemmConfig ----------------------------------------------------------
def _gemm_config_parameters() -> list:
    """[(C++ type, name)] of `template <...> struct GemmConfig`'s parameter list, in order."""
    text = _strip_comments(GEMM_CUH.read_text())
    found = re.findall(r"template\s*<([^<>]*)>\s*struct\s+GemmConfig\s*\{", text)
    assert len(found) == 1, f"{GEMM_CUH}: expected one definition of struct GemmConfig, found {len(found)}"
    params = []
    for decl in found[0].split(","):
        m = re.fullmatch(r"\s*(int|bool)\s+(\w+)\s*", decl)
        assert m, f"unexpected template parameter {decl.strip()!r} of GemmConfig"
        params.append((m.group(1), m.group(2)))
    return params


def _cpp_name(field: str) -> str:
    """shape_n -> kShapeN_, scale_loader_warp -> kScaleLoaderWarp_."""
    return "k" + "".join(part[:1].upper() + part[1:] for part in field.split("_")) + "_"


def test_cpp_name_rule():
    assert [_cpp_name(f) for f in ("shape_n", "block_m", "scale_loader_warp", "stage_k_blocks", "split_k")] == \
        ["kShapeN_", "kBlockM_", "kScaleLoaderWarp_", "kStageKBlocks_", "kSplitK_"]


def test_gemm_config_template_matches_kernel_config_fields():
    cpp = _gemm_config_parameters()
    fields = dataclasses.fields(KernelConfig)
    assert [name for _, name in cpp] == [_cpp_name(f.name) for f in fields], (
        "KernelConfig's fields and GemmConfig's template parameters must list the same things in the same "
        "order (config.KernelConfig.template_args writes one from the other)")
    # Types: flags are bool template parameters, everything else (the layout included) an int.
    for (cpp_type, name), f in zip(cpp, fields):
        assert cpp_type == ("bool" if f.type in ("bool", bool) else "int"), (name, f.type)


def test_template_args_fill_every_parameter():
    c = KernelConfig(shape_n=4096, shape_k=7168, block_m=64, block_n=16, num_stages=10, stage_k_blocks=2,
                     layout=cfg.Layout.MASKED, num_groups=8, raster_group=8, pipelined=True, scale_loader_warp=True)
    args = c.template_args().split(", ")
    cpp = _gemm_config_parameters()
    assert len(args) == len(cpp)
    for (cpp_type, _), value in zip(cpp, args):
        assert (value in ("true", "false")) if cpp_type == "bool" else re.fullmatch(r"-?\d+", value), value
    assert args == ["4096", "7168", "64", "16", "10", "2", "2", "8", "8", "1", "true", "false", "true", "false", "false",
                    "false", "false", "false", "false", "0", "false"]


# ---- config.GEMM_PARAMS <-> deep_gemm::GemmParams ----------------------------------------------------
def _gemm_params_members() -> list:
    """[(kind, name)] of `struct GemmParams`'s members, in order (kind: map, ptr or i32)."""
    text = _strip_comments(GEMM_CUH.read_text())
    body = re.findall(r"struct\s+GemmParams\s*\{(.*?)\};", text, flags=re.S)
    assert len(body) == 1, f"{GEMM_CUH}: expected one definition of struct GemmParams"
    members = []
    for decl in filter(None, (d.strip() for d in body[0].split(";"))):
        m = re.fullmatch(r"((?:const\s+)?\w+\s*\**)\s*(.+)", decl, flags=re.S)
        assert m, decl
        ctype, names = m.group(1).replace(" ", ""), [n.strip() for n in m.group(2).split(",")]
        kind = PTR if ctype.endswith("*") else MAP if ctype == "TmaDescriptor" else I32 if ctype in (
            "int32_t", "int") else None
        assert kind is not None, f"member type {ctype} of GemmParams has no kind in config.GEMM_PARAMS"
        members += [(kind, name) for name in names]
    return members


def test_gemm_params_list_matches_the_struct():
    assert [(kind, name) for name, kind in GEMM_PARAMS] == _gemm_params_members()


def test_param_layout_follows_cpp_rules():
    offsets, size = param_layout()
    assert list(offsets) == [name for name, _ in GEMM_PARAMS]
    # Seven 128-byte maps, three pointers, five int32 (padded to 8 for the next pointer), three pointers.
    assert [offsets[f"tma_{n}"] for n in ("a", "b", "sa", "out", "a_tail", "sa_tail", "sb")] == \
        [0, 128, 256, 384, 512, 640, 768]
    assert (offsets["sa"], offsets["sb"], offsets["out"]) == (896, 904, 912)
    assert [offsets[n] for n in ("out_ld_bytes", "shape_m", "sa_rows", "sa_ld", "a_tail_rows")] == [920, 924, 928,
                                                                                                     932, 936]
    assert (offsets["group_info"], offsets["workspace"], offsets["tile_counters"]) == (944, 952, 960)
    assert size == 1024   # rounded up to the maps' 64-byte alignment
    # Arrays (the K-grouped parameter): G maps of A, G of B, then G int32 twice, padded to 64.
    offs, total = param_layout(k_grouped_params(3))
    assert offs == {"tma_a": 0, "tma_b": 384, "k_blocks": 768, "kb_offset": 780} and total == 832
    # Generic rules on a made-up struct: alignment padding, and the size a multiple of the largest alignment.
    offs, total = param_layout((("x", I32), ("p", PTR), ("y", I32)))
    assert offs == {"x": 0, "p": 8, "y": 16} and total == 24
    offs, total = param_layout((("x", I32), ("m", MAP)))
    assert offs == {"x": 0, "m": 64} and total == 192


def test_pack_gemm_params_matches_param_layout():
    from deep_gemm.runtime import launch
    offsets, size = param_layout()
    assert launch.GEMM_PARAM_NAMES == tuple(name for name, _ in GEMM_PARAMS)
    assert launch.GEMM_PARAM_OFFSETS == (0,)   # one struct parameter
    values = {}
    for i, (name, kind) in enumerate(GEMM_PARAMS):
        values[name] = (bytes([i + 1]) * 64 + bytes(range(i, i + 64))) if kind == MAP else \
            0x1000_0000_0000 + 0x1111 * (i + 1) if kind == PTR else -7 - 1000 * i
    packed = launch.pack_gemm_params(**values)
    assert isinstance(packed, bytes) and len(packed) == size
    covered = bytearray(size)
    for name, kind in GEMM_PARAMS:
        at = offsets[name]
        if kind == MAP:
            assert packed[at:at + 128] == values[name], name
            width = 128
        elif kind == PTR:
            assert struct.unpack_from("<Q", packed, at)[0] == values[name], name
            width = 8
        else:
            assert struct.unpack_from("<i", packed, at)[0] == values[name], name
            width = 4
        assert not any(covered[at:at + width]), f"{name} overlaps another field"
        covered[at:at + width] = b"\x01" * width
    # Everything between and after the fields is zero padding.
    assert all(b == 0 for b, used in zip(packed, covered) if not used)


def test_pack_gemm_params_rejects_bad_values():
    from deep_gemm.runtime import launch
    values = {name: bytes(128) if kind == MAP else 0 for name, kind in GEMM_PARAMS}
    launch.pack_gemm_params(**values)
    with pytest.raises(ValueError, match="pack_gemm_params"):
        launch.pack_gemm_params(**{k: v for k, v in values.items() if k != "shape_m"})
    with pytest.raises(ValueError, match="pack_gemm_params"):
        launch.pack_gemm_params(**values, extra=1)
    with pytest.raises(struct.error):   # an int32 overflow is an error, not a wrapped value
        launch.pack_gemm_params(**{**values, "shape_m": 2**31})


def test_generated_source_checks_every_offset():
    from deep_gemm.jit.kernel_source import gemm_kernel_name, gemm_source
    c = KernelConfig(shape_n=256, shape_k=512, block_m=64, block_n=64, num_stages=2, raster_group=8)
    source, name = gemm_source(c)
    assert name == gemm_kernel_name(c) == f"deep_gemm::gemm_kernel<deep_gemm::GemmConfig<{c.template_args()}>>"
    assert source.count('#include "gemm.cuh"') == 1
    offsets, size = param_layout()
    for param, _ in GEMM_PARAMS:
        assert f"__builtin_offsetof(deep_gemm::GemmParams, {param}) == {offsets[param]}" in source, param
    assert f"sizeof(deep_gemm::GemmParams) == {size}" in source
    assert f"template __global__ void {name}(const __grid_constant__ deep_gemm::GemmParams);" in source


def _swapped(params, a, b):
    params = list(params)
    i, j = [n for n, _ in params].index(a), [n for n, _ in params].index(b)
    params[i], params[j] = params[j], params[i]
    return tuple(params)


def _inserted(params, before, item):
    params = list(params)
    params.insert([n for n, _ in params].index(before), item)
    return tuple(params)


# A wrong GEMM_PARAMS and what the compiler then says. (A field of the wrong kind at an unchanged
# offset, e.g. a pointer listed as an int32 just before another pointer, gives the same offsets
# and so the same source: the member kinds are held to the struct by
# test_gemm_params_list_matches_the_struct instead.)
CORRUPTED = {
    "swap_pointers": (_swapped(GEMM_PARAMS, "sa", "sb"), "GemmParams.sa"),
    "swap_maps": (_swapped(GEMM_PARAMS, "tma_a", "tma_b"), "GemmParams.tma_a"),
    "swap_int32": (_swapped(GEMM_PARAMS, "shape_m", "sa_rows"), "GemmParams.shape_m"),
    "extra_i32": (_inserted(GEMM_PARAMS, "out_ld_bytes", ("num_groups", I32)), "GemmParams.out_ld_bytes"),
    "last_missing": (GEMM_PARAMS[:-1], "GemmParams' size"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTED))
def test_parameter_block_is_checked_against_the_struct(tmp_cache_dir, monkeypatch, case):
    """A GEMM_PARAMS that disagrees with the C++ struct makes the kernel fail to compile (the
    generated source's static_asserts), instead of a launch reading parameters at wrong offsets."""
    from deep_gemm.jit import CompilationError, compile_kernel, kernel_source
    monkeypatch.delenv("DG_JIT_USE_NVCC", raising=False)
    c = KernelConfig(shape_n=256, shape_k=512, block_m=64, block_n=64, num_stages=2, raster_group=8)
    good, name = kernel_source.gemm_source(c)
    compile_kernel(good, name, arch="sm_90a", name="params_ok")   # the real list compiles
    params, needle = CORRUPTED[case]
    monkeypatch.setattr(cfg, "GEMM_PARAMS", params)
    monkeypatch.setattr(kernel_source, "GEMM_PARAMS", params)
    bad, bad_name = kernel_source.gemm_source(c)
    assert bad != good and bad_name == name
    with pytest.raises(CompilationError, match="GemmParams") as info:
        compile_kernel(bad, name, arch="sm_90a", name=f"corrupt_{case}")
    assert needle in info.value.log


# ---- the Python package's import graph ---------------------------------------------------------------
def _modules() -> dict:
    """{dotted module name: (path, is a package's __init__)} of every deep_gemm/**/*.py."""
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def _import_graph() -> dict:
    """{module: {deep_gemm modules it imports}}, from every import statement anywhere in it (inside
    functions too), relative ones resolved. `from pkg import name` depends on pkg.name when that
    is a module, else on pkg; a namespace package (a folder without __init__.py) has no code."""
    mods = _modules()
    root = PACKAGE.name
    graph = {}
    for mod, (path, is_pkg) in mods.items():
        package = mod if is_pkg else mod.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    assert node.level - 1 < len(base), f"{path}:{node.lineno}: relative import beyond the package"
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                targets = subs if node.module is None and len(subs) == len(node.names) else [target] + subs
            for target in targets:
                if target.split(".")[0] != root:
                    continue
                if target in mods:
                    if target != mod:
                        edges.add(target)
                else:   # only a namespace package may be imported without being a module
                    assert (PACKAGE.parent / target.replace(".", "/")).is_dir(), \
                        f"{path}:{node.lineno} imports {target}, which does not exist"
        graph[mod] = edges
    return graph


def _find_cycle(graph: dict):
    state, stack = {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                return stack[stack.index(v):] + [v]
            if v not in state:
                cycle = visit(v)
                if cycle:
                    return cycle
        stack.pop()
        state[u] = "done"
        return None

    for u in sorted(graph):
        if u not in state:
            cycle = visit(u)
            if cycle:
                return cycle
    return None


def test_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_import_graph_is_read_as_python_imports():
    graph = _import_graph()
    assert len(graph) >= 25 and "deep_gemm" in graph and "deep_gemm.jit" in graph
    # Spot checks: relative imports at module level and inside functions are resolved.
    assert "deep_gemm.config" in graph["deep_gemm.plan"]                  # from .config import ...
    assert "deep_gemm.runtime.kernels" in graph["deep_gemm.ops.gemm"]     # from ..runtime import kernels (a function)
    assert "deep_gemm.ops.pad" in graph["deep_gemm.ops.gemm"]             # from .pad import pad_k16 (in a function)
    assert "deep_gemm.jit.kernel_source" in graph["deep_gemm.jit.precompile_cli"]   # inside main()


def test_no_import_cycles():
    cycle = _find_cycle(_import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_utils_imports_nothing_of_the_package():
    graph = _import_graph()
    assert graph["deep_gemm.utils"] == set()
    tree = ast.parse((PACKAGE / "utils.py").read_text())
    relative = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level]
    assert not relative, f"deep_gemm/utils.py has relative imports on lines {relative}"


def test_config_and_plan_are_pure_python():
    # The planner and the kernel description import no torch, no CUDA and no other module of the
    # package but config (unit-testable and importable anywhere).
    graph = _import_graph()
    assert graph["deep_gemm.config"] == set() and graph["deep_gemm.plan"] == {"deep_gemm.config"}
    for mod in ("config", "plan"):
        tree = ast.parse((PACKAGE / f"{mod}.py").read_text())
        names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
        names |= {node.module.split(".")[0] for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom) and node.module and not node.level}
        assert not names & {"torch", "cuda", "numpy", "triton"}, (mod, names)
