"""The cheap path of calls on new tensors (runtime/launch.LaunchTemplate, runtime/tma.py's patched
tensor maps), for every public GEMM and cast.

CPU: the fake driver of tests/test_host_path.py, with tensor maps laid out as a driver might lay
them out (the address >> 4 at a fixed offset, the other arguments' digest around it), so that maps
may be patched. Counters show a call at new addresses of a seen layout costs no validation, plan,
kernel lookup, module load or tensor-map encode, just one launch, whose parameter bytes equal what
the long path builds from scratch; tensors seen twice get a cached launch of their own; a change of
stride, dtype, type, device, shape or alignment goes the long way and gets the full check's error;
a driver whose maps cannot be patched gets the long path every time. The benchmark of these paths
(deep_gemm/bench_host.py) runs on the fake too. GPU: the real driver's maps patch exactly, and
results on new tensors are right.
"""
from __future__ import annotations

import ctypes
import hashlib
import struct
import threading
import types

import pytest
import torch

import deep_gemm
import test_host_path as hp
from deep_gemm import reference
from deep_gemm.ops import cast as cast_ops
from deep_gemm.ops import gemm as gemm_ops
from deep_gemm.runtime import kernels, launch, tma

fake = hp.fake                       # the fake-driver fixture
FP8 = torch.float8_e4m3fn
ADDRESS_AT = 16                      # where the fake layout keeps address >> 4


class PatchableMaps:
    """cuTensorMapEncodeTiled of a plausible layout: bytes 16..23 hold the address >> 4 (little
    endian), the rest a digest of every other argument. `encodes` counts calls; `refuse` makes
    the probe address of runtime/tma.py fail as unknown memory; `checksum` also writes a digest of the
    address into bytes 120..127, which patching the address field alone cannot reproduce."""

    def __init__(self):
        self.encodes = 0
        self.known = set()      # addresses encoded
        self.refuse = False
        self.checksum = False
        self._keep = []

    def __call__(self, dtype, rank, address, dims, strides, box, *rest):
        self.encodes += 1
        if self.refuse and any(address == known ^ tma._PROBE_FLIP for known in self.known):
            return 1, None   # the probe of an address it knows: memory it does not know
        self.known.add(address)
        digest = hashlib.sha512(repr((dtype, rank, dims, strides, box, rest)).encode()).digest()
        raw = bytearray(digest[:ADDRESS_AT] + (address >> 4).to_bytes(8, "little") + digest[ADDRESS_AT:] + digest[:56])
        if self.checksum:
            raw[120:128] = hashlib.sha256(address.to_bytes(8, "little")).digest()[:8]
        buf = ctypes.create_string_buffer(bytes(raw), 128)
        self._keep.append(buf)
        return 0, types.SimpleNamespace(getPtr=lambda: ctypes.addressof(buf))


class Counts:
    """What the calls since the last `take()` cost: validations, plans, prepared launches, kernel
    lookups, module loads, tensor-map encodes and launches."""
    NAMES = ("validations", "plans", "prepares", "lookups", "loads", "encodes", "launches")

    def __init__(self, fake_driver, maps):
        self.fake, self.maps = fake_driver, maps
        self.validations = self.plans = self.lookups = 0
        self.fired = []          # (grid, stream, parameter bytes) of every fire
        self._last = self._now()

    def _now(self):
        return (self.validations + self.fake.validations, self.plans, self.fake.prepares, self.lookups,
                self.fake.loads, self.maps.encodes, len(self.fired))

    def take(self) -> dict:
        now = self._now()
        delta = dict(zip(self.NAMES, (b - a for a, b in zip(self._last, now))))
        self._last = now
        return delta


CHEAP = {"validations": 0, "plans": 0, "prepares": 0, "lookups": 0, "loads": 0, "encodes": 0, "launches": 1}


def _counting(counts, attr, real):
    def counted(*args, **kwargs):
        setattr(counts, attr, getattr(counts, attr) + 1)
        return real(*args, **kwargs)
    return counted


@pytest.fixture
def cheap(fake, monkeypatch):
    """The fake driver with patchable maps, the casts on their GPU path too, and Counts."""
    maps = PatchableMaps()
    monkeypatch.setattr(fake, "cuTensorMapEncodeTiled", maps)
    counts = Counts(fake, maps)
    monkeypatch.setattr(gemm_ops, "check_k_grouped", _counting(counts, "validations", gemm_ops.check_k_grouped))
    counted_reference = types.ModuleType("reference")   # what ops/cast.py sees: x's checks counted
    counted_reference.__dict__.update(reference.__dict__)
    for name in ("check_cast_input", "check_transposed_cast_input"):   # the casts' validation starts with x
        setattr(counted_reference, name, _counting(counts, "validations", getattr(reference, name)))
    monkeypatch.setattr(cast_ops, "reference", counted_reference)
    monkeypatch.setattr(gemm_ops, "plan_cached", _counting(counts, "plans", gemm_ops.plan_cached))
    for module, name in ((kernels, "gemm_kernel"), (cast_ops, "cast_kernel")):
        monkeypatch.setattr(module, name, _counting(counts, "lookups", getattr(module, name)))
    # The casts' GPU path on CPU tensors (their current device reads as x's index, None).
    monkeypatch.setattr(cast_ops, "_on_cuda", lambda x: True)
    monkeypatch.setattr(cast_ops, "runs_on_hopper", lambda device: True)
    monkeypatch.setattr(cast_ops, "_current_device", lambda: None)
    monkeypatch.setattr(cast_ops, "_launches", launch.LaunchCache())
    monkeypatch.setattr(cast_ops, "_loaded", {})
    monkeypatch.setattr(cast_ops, "_fresh_layouts", {})
    real_fire = launch.PreparedLaunch.fire

    def fire(self):
        counts.fired.append((self.grid, self.stream, self.params))
        _check_pointer_array(self)
        real_fire(self)
    monkeypatch.setattr(launch.PreparedLaunch, "fire", fire)
    monkeypatch.setattr(fake, "cuLaunchKernelEx", lambda *args: (0,))   # parameters are read by `fire` above
    counts.take()
    yield counts


def _check_pointer_array(prepared):
    """The array the driver reads at `address` points at each parameter in this launch's own buffer."""
    base = ctypes.addressof(prepared._buffer)
    got = struct.unpack_from(f"<{len(prepared.offsets)}Q", prepared._buffer, prepared.address - base)
    assert got == tuple(base + offset for offset in prepared.offsets)


def from_scratch(counts, fn, args):
    """The parameters the long path launches for `args` with every cache empty (launches,
    templates, tensor maps), then the caches as they were."""
    saved = gemm_ops._launches, cast_ops._launches
    gemm_ops._launches, cast_ops._launches = launch.LaunchCache(), launch.LaunchCache()
    tma.clear_caches()
    try:
        result = fn(*args)
    finally:
        gemm_ops._launches, cast_ops._launches = saved
    counts.take()
    return counts.fired[-1], result


# ---- every public GEMM and cast, as calls on fresh tensors of one layout ---------------------------
def _col_major(m, kb, lead=()):
    aligned = (m + 3) // 4 * 4
    return torch.zeros(lead + (kb, aligned)).transpose(-1, -2)[..., :m, :]


def _dense(m=128, n=256, k=384, out_dtype=torch.bfloat16, row_b=False):
    def build():
        a = torch.zeros(m, k, dtype=torch.uint8).view(FP8)
        b = torch.zeros(n, k, dtype=torch.uint8).view(FP8)
        sb = _col_major(n, (k + 127) // 128) if row_b else torch.ones((n + 127) // 128, (k + 127) // 128)
        return (a, _col_major(m, (k + 127) // 128)), (b, sb), torch.zeros(m, n, dtype=out_dtype)
    return build


def _contiguous():
    return lambda: hp.contiguous_inputs()


def _masked():
    def build():
        return (*hp.masked_inputs(), 32)
    return build


K_SIZES = [128, 0, 256, 48]


def _k_grouped(m=128, n=96, ks=K_SIZES):
    kb = sum((k + 127) // 128 for k in ks)

    def build():
        a = (torch.zeros(m * sum(ks), dtype=torch.uint8).view(FP8), torch.ones(kb, m))
        b = (torch.zeros(n * sum(ks), dtype=torch.uint8).view(FP8), torch.ones(kb, n))
        return a, b, torch.zeros(len(ks), m, n), list(ks)
    return build


def _x(shape, dtype=torch.bfloat16):
    return lambda: (torch.randn(shape).to(dtype),)


def _into(kind, shape):
    def build():
        x = torch.randn(shape).to(torch.bfloat16)
        q = torch.empty(shape, dtype=torch.uint8).view(FP8)
        *lead, m, k = shape
        kb = (k + 127) // 128
        if kind == "token":
            s = _col_major(m, kb, tuple(lead))
        else:
            s = torch.empty(*lead, (m + 127) // 128, kb)
        return x, q, s
    return build


def _transposed_into(t=256, h=384, ks=None):
    def build():
        x = torch.randn(t, h).to(torch.bfloat16)
        if ks is None:
            return x, torch.empty(h, t, dtype=torch.uint8).view(FP8), _col_major(h, (t + 127) // 128)
        kb = sum((k + 127) // 128 for k in ks)
        return x, list(ks), torch.empty(t * h, dtype=torch.uint8).view(FP8), torch.empty(kb, h)
    return build


def _fp8_gemm_nt_fp32(lhs, rhs, d):
    deep_gemm.fp8_gemm_nt(lhs, rhs, d, c=d, recipe=(1, 1, 128))


def _fp8_gemm_nt_bf16_row(lhs, rhs, d):
    deep_gemm.fp8_gemm_nt(lhs, rhs, d, recipe=(1, 1, 128))


def _m_grouped_v2(lhs, rhs, d, m_indices):
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous(lhs, rhs, d, m_indices)


def _masked_v2(lhs, rhs, d, masked_m, expected_m):
    deep_gemm.m_grouped_fp8_gemm_nt_masked(lhs, rhs, d, masked_m, expected_m)


def _k_grouped_v2(lhs, rhs, d, ks):
    deep_gemm.k_grouped_fp8_gemm_nt_contiguous(lhs, rhs, d, ks, torch.tensor(ks, dtype=torch.int32), c=d)


GEMMS = {
    "dense": (deep_gemm.gemm_fp8_fp8_bf16_nt, _dense()),
    "dense_tail": (deep_gemm.gemm_fp8_fp8_bf16_nt, _dense(m=200)),           # a partial last M block
    "dense_fp8_gemm_nt": (deep_gemm.fp8_gemm_nt, _dense(m=64, n=7168, k=2048)),
    "dense_row_scales_bf16": (_fp8_gemm_nt_bf16_row, _dense(row_b=True)),
    "dense_fp32_accumulate": (_fp8_gemm_nt_fp32, _dense(out_dtype=torch.float32, row_b=True)),
    "wgrad": (deep_gemm.wgrad_gemm_fp8_fp8_fp32_nt, _dense(m=256, n=512, k=512, out_dtype=torch.float32,
                                                           row_b=True)),
    "contiguous": (deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous, _contiguous()),
    "contiguous_v2": (_m_grouped_v2, _contiguous()),
    "masked": (deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked, _masked()),
    "masked_v2": (_masked_v2, _masked()),
    "k_grouped": (deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt, _k_grouped()),
    "k_grouped_v2": (_k_grouped_v2, _k_grouped()),
}
CASTS_INTO = {
    "per_token_into": (cast_ops.per_token_cast_into, _into("token", (128, 384))),
    "per_token_into_3d": (cast_ops.per_token_cast_into, _into("token", (2, 64, 256))),
    "per_block_into": (cast_ops.per_block_cast_into, _into("block", (256, 384))),
    "transposed_into": (cast_ops.per_token_cast_transposed_into, _transposed_into()),
    "k_grouped_transposed_into": (cast_ops.k_grouped_per_token_cast_transposed_into, _transposed_into(ks=[128, 0, 64, 64])),
}
CASTS = {   # the public casts, whose outputs are allocated per call
    "per_token_cast_to_fp8": (deep_gemm.per_token_cast_to_fp8, _x((128, 384))),
    "per_block_cast_to_fp8": (deep_gemm.per_block_cast_to_fp8, _x((256, 384))),
    "per_token_cast_to_fp8_transposed": (deep_gemm.per_token_cast_to_fp8_transposed, _x((256, 384))),
    "k_grouped_per_token_cast_to_fp8_transposed": (
        lambda x: deep_gemm.k_grouped_per_token_cast_to_fp8_transposed(x, [128, 0, 64, 64]), _x((256, 384))),
}


@pytest.mark.parametrize("name", list(GEMMS) + list(CASTS_INTO))
def test_new_addresses_of_a_seen_layout_take_the_cheap_path(cheap, name):
    fn, build = {**GEMMS, **CASTS_INTO}[name]
    first = build()
    fn(*first)
    long_way = cheap.take()
    assert long_way["validations"] == 1 and long_way["lookups"] >= 1 and long_way["launches"] == 1
    assert long_way["prepares"] == (1 if name in GEMMS else 0)
    for _ in range(3):   # tensors at new addresses, the same layout: no check, plan, lookup or encode
        args = build()
        fn(*args)
        assert cheap.take() == CHEAP
        got = cheap.fired[-1]
        assert got == from_scratch(cheap, fn, args)[0], "the cheap path must launch what the long path builds"
    # The very same tensors again: a launch of their own, cached; from then on, the launch cache.
    fn(*args)
    assert cheap.take() == CHEAP and cheap.fired[-1] == got
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(launch.LaunchTemplate, "bind", lambda *a: pytest.fail("a hit bound a template"))
        mp.setattr(launch.LaunchTemplate, "fire", lambda *a: pytest.fail("a hit fired a template"))
        fn(*args)
    assert cheap.take() == CHEAP and cheap.fired[-1] == got


V2_CALLS = {   # GEMMS' DeepGEMM 2.x calls: the public function and the keywords of the call
    "dense_fp8_gemm_nt": (deep_gemm.fp8_gemm_nt, {}),
    "dense_row_scales_bf16": (deep_gemm.fp8_gemm_nt, {"recipe": (1, 1, 128)}),
    "dense_fp32_accumulate": (deep_gemm.fp8_gemm_nt, {"recipe": (1, 1, 128), "c": "d"}),
    "contiguous_v2": (deep_gemm.m_grouped_fp8_gemm_nt_contiguous, {}),
    "masked_v2": (deep_gemm.m_grouped_fp8_gemm_nt_masked, {}),
}


@pytest.mark.parametrize("name", list(V2_CALLS))
def test_v2_calls_skip_their_checks_only_on_the_cache(cheap, monkeypatch, name):
    """The DeepGEMM 2.x FP8 calls with the usual arguments fire a cached launch (or its layout's
    template) before the 2.x argument checks, which that launch has passed; any other argument is
    checked."""
    fn, build = GEMMS[name]
    public, kw = V2_CALLS[name]
    args = build()
    fn(*args)
    cheap.take()
    import deep_gemm.api as api
    monkeypatch.setattr(api, "_check_pairs", lambda *a: pytest.fail("a cached 2.x call ran the 2.x checks"))
    fn(*args)
    fn(*build())   # new addresses, the same layout
    assert cheap.take()["launches"] == 2
    monkeypatch.undo()
    kw = {k: args[2] if v == "d" else v for k, v in kw.items()}
    for bad, exc, match in (({"compiled_dims": "mnx"}, ValueError, "compiled_dims"),
                            ({"disable_ue8m0_cast": "yes"}, TypeError, "disable_ue8m0_cast"),
                            ({"recipe": (1, 2, 3)}, ValueError, "recipe"),
                            ({"recipe": (1, True, 128)}, (TypeError, ValueError), "recipe")):
        with pytest.raises(exc, match=match):
            public(*args, **{**kw, **bad})
    assert cheap.take()["launches"] == 0


@pytest.mark.parametrize("name", list(CASTS))
def test_public_casts_on_new_inputs_take_the_cheap_path(cheap, name):
    """The allocating casts: their outputs are new tensors too. x's layout was validated before, so
    its outputs' layout is looked up (no check), then the launch takes the cheap path. The
    parameters are the long path's but for the three addresses, which are x's and the returned
    outputs'."""
    fn, build = CASTS[name]
    fn(*build())
    assert cheap.take()["lookups"] == 1
    for _ in range(3):
        args = build()
        q, s = fn(*args)
        assert cheap.take() == CHEAP
        grid, stream, params = cheap.fired[-1]
        assert params[:24] == struct.pack("<3Q", args[0].data_ptr(), q.data_ptr(), s.data_ptr())
        (grid0, stream0, params0), (q0, s0) = from_scratch(cheap, fn, args)
        assert params0[:24] == struct.pack("<3Q", args[0].data_ptr(), q0.data_ptr(), s0.data_ptr())
        assert (grid, stream, params[24:]) == (grid0, stream0, params0[24:])


def test_m_changing_over_seen_batch_sizes_takes_the_cheap_path(cheap):
    """Eight batch sizes, then each again with new scale and output tensors (A a view of one
    buffer): every repeat is cheap and launches the long path's parameters for its M."""
    a_all = torch.zeros(256, 384, dtype=torch.uint8).view(FP8)
    b, sb = torch.zeros(512, 384, dtype=torch.uint8).view(FP8), torch.ones(4, 3)
    ms = (256, 200, 128, 96, 64, 33, 8, 1)

    def call(m):
        return (a_all[:m], _col_major(m, 3)), (b, sb), torch.empty(m, 512, dtype=torch.bfloat16)
    for m in ms:
        deep_gemm.gemm_fp8_fp8_bf16_nt(*call(m))
    assert cheap.take()["validations"] == len(ms)
    for m in ms * 2:
        args = call(m)
        deep_gemm.gemm_fp8_fp8_bf16_nt(*args)
        assert cheap.take() == CHEAP, m
        assert cheap.fired[-1] == from_scratch(cheap, deep_gemm.gemm_fp8_fp8_bf16_nt, args)[0], m
    # A batch size never seen: the long way, once.
    deep_gemm.gemm_fp8_fp8_bf16_nt(*call(17))
    assert cheap.take()["validations"] == 1
    deep_gemm.gemm_fp8_fp8_bf16_nt(*call(17))
    assert cheap.take() == CHEAP


def _at(t: torch.Tensor, offset_bytes: int) -> torch.Tensor:
    """t's values in a new tensor with t's shape and strides, starting offset_bytes past a 64-byte
    aligned address, in a storage with room for twice its extent (so that a view with doubled
    strides stays inside it)."""
    extent = (1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))) * t.element_size()
    raw = torch.zeros(2 * extent + offset_bytes + 64, dtype=torch.uint8)
    start = (-raw.data_ptr()) % 64 + offset_bytes
    view = raw[start:].view(torch.uint8)[:2 * extent].view(t.dtype).as_strided(t.shape, t.stride())
    view.view(torch.uint8).copy_(t.view(torch.uint8)) if t.dtype == FP8 else view.copy_(t)
    return view


def _changes(fake_driver, t):
    """(what, tensor): t's layout at a new address, changed in one respect."""
    yield "dtype", _at(t, 0).view(hp._SAME_SIZE_DTYPE[t.dtype])
    yield "type", torch.nn.Parameter(_at(t, 0), requires_grad=False)
    if t.shape[0] > 1:
        yield "shape", _at(t, 0).narrow(0, 0, t.shape[0] - 1)
    strides = list(t.stride())
    strides[0] *= 2
    yield "stride", _at(t, 0).as_strided(t.shape, strides)
    yield "device", fake_driver.alias(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta"),
                                      _at(t, 0))
    yield "alignment", _at(t, 8)


@pytest.mark.parametrize("layout", list(hp.FUNCTIONS), ids=lambda layout: layout.name.lower())
def test_a_template_never_serves_another_layout(cheap, layout):
    """Tensors at new addresses whose layout differs from the seen one in stride, dtype, type,
    shape, device or 16-byte alignment: the long way, validated, with exactly the full check's
    error, or else exactly the long path's parameters."""
    fn = hp.FUNCTIONS[layout]
    flat = hp._flat_inputs(layout)
    fn(*hp._call(layout, flat))
    fn(*hp._call(layout, [_at(t, 0) for t in flat]))
    assert cheap.take()["validations"] == 1, "the same layout at new addresses: the cheap path"
    rejected = accepted = 0
    for i, t in enumerate(flat):
        for what, variant in _changes(cheap.fake, t):
            others = [_at(x, 0) for x in flat]
            call = hp._call(layout, others[:i] + [variant] + others[i + 1:])
            try:
                hp.REAL_CHECK(layout, *call)
            except (TypeError, ValueError) as e:
                expected = e
            else:
                expected = None
            cheap.take()
            if expected is not None:
                with pytest.raises(type(expected)) as info:
                    fn(*call)
                assert str(info.value) == str(expected), (hp.NAMES[i], what)
                assert cheap.take()["validations"] == 1, (hp.NAMES[i], what)
                rejected += 1
            else:
                fn(*call)
                took = cheap.take()
                assert took["validations"] == 1 and took["launches"] == 1, (hp.NAMES[i], what)
                tensors = others[:i] + [variant] + others[i + 1:]   # (copies the long path makes read as "other")
                assert hp.describe(cheap.fake, cheap.fired[-1][2], tensors) == \
                    hp.describe(cheap.fake, from_scratch(cheap, fn, call)[0][2], tensors), (hp.NAMES[i], what)
                accepted += 1
    assert rejected >= 3 * len(flat) and accepted >= len(flat)


def test_misaligned_cast_input_takes_the_long_way(cheap):
    """A cast's 16-byte loads depend on x's alignment: x 2 bytes off a seen layout's alignment
    gets the long path, hence the element-wise kernel, not the template of the aligned one."""
    x, q, s = _into("token", (128, 384))()
    cast_ops.per_token_cast_into(x, q, s)
    cast_ops.per_token_cast_into(_at(x, 0), q, s)
    assert cheap.take()["lookups"] == 1
    seen = {config for config, _ in cast_ops._loaded}
    assert [config.vec for config in seen] == [True]
    cast_ops.per_token_cast_into(_at(x, 2), q, s)
    took = cheap.take()
    assert took["validations"] == 1 and took["lookups"] == 1
    assert sorted(config.vec for config, _ in cast_ops._loaded) == [False, True]


def test_k_sizes_are_part_of_the_layout(cheap):
    fn, build = GEMMS["k_grouped"]
    fn(*build())
    a, b, out, ks = build()
    fn(a, b, out, list(ks))
    assert cheap.take()["validations"] == 1
    other = [ks[1], ks[0], *ks[2:]]            # the same total K, other group sizes: the long way
    fn(a, b, out, other)
    assert cheap.take()["validations"] == 1
    fn(a, b, torch.zeros_like(out), other)
    assert cheap.take() == CHEAP


def _k_grouped_device(spare_k=128):
    """The K-grouped layout with the sizes as an int32 tensor (read on the device) and operands
    holding `spare_k` more tokens than the groups use."""
    def build():
        a, b, out, ks = _k_grouped(ks=K_SIZES + [spare_k])()
        return a, b, out[:len(K_SIZES)].clone(), torch.tensor(K_SIZES, dtype=torch.int32)
    return build


def _k_grouped_device_v2(lhs, rhs, d, sizes):
    deep_gemm.k_grouped_fp8_gemm_nt_contiguous(lhs, rhs, d, None, sizes, c=d)


@pytest.mark.parametrize("fn", [deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt, _k_grouped_device_v2])
def test_device_sizes_on_new_tensors_take_the_cheap_path(cheap, fn):
    """Sizes on the device: two launches a call (the groups' tensor maps, then the GEMM), both
    re-addressed from their templates for new tensors, byte for byte what the long path builds."""
    build = _k_grouped_device()
    fn(*build())
    long_way = cheap.take()
    assert long_way["validations"] == 1 and long_way["prepares"] == 1 and long_way["launches"] == 2
    for _ in range(3):
        args = build()
        fn(*args)
        assert cheap.take() == {**CHEAP, "launches": 2}
        got = cheap.fired[-2:]
        from_scratch(cheap, fn, args)
        assert got == cheap.fired[-2:], "the cheap path must launch what the long path builds"
    sizes = args[3]
    fn(*args[:3], sizes.clone())   # other sizes tensor, same layout: re-addressed too
    assert cheap.take() == {**CHEAP, "launches": 2}
    assert cheap.fired[-2][2] != got[0][2] and cheap.fired[-1][2] == got[1][2]   # only the maps kernel reads it
    with pytest.raises(TypeError, match=r"must be torch.int32"):   # another dtype: the long way, and its error
        fn(*args[:3], sizes.long())


def test_k_sizes_equal_to_cached_ints_but_of_another_type_get_the_full_check(cheap):
    """A bool (False == 0) or a numpy int hashes like the int of a cached call's key: such sizes
    must go the long way, on the same tensors and on new ones, and get validation's error."""
    fn, build = GEMMS["k_grouped"]
    a, b, out, ks = build()
    fn(a, b, out, ks)
    fn(*build())
    cheap.take()
    np = pytest.importorskip("numpy")
    for args in ((a, b, out), build()[:3]):
        with pytest.raises(TypeError, match=r"^k_sizes\[1\] must be a Python int, got bool"):
            fn(*args, [ks[0], False, *ks[2:]])
        with pytest.raises(TypeError, match=r"^k_sizes\[0\] must be a Python int, got int64"):
            fn(*args, [np.int64(ks[0]), *ks[1:]])
    took = cheap.take()
    assert took["validations"] == 4 and took["launches"] == 0


def test_fp8_gemm_nt_recipe_of_unhashable_items_gets_the_recipe_error(cheap):
    lhs, rhs, d = _dense(out_dtype=torch.float32, row_b=True)()
    deep_gemm.fp8_gemm_nt(lhs, rhs, d, c=d, recipe=(1, 1, 128))
    with pytest.raises(TypeError, match=r"^recipe must be a tuple of 3 ints"):
        deep_gemm.fp8_gemm_nt(lhs, rhs, d, c=d, recipe=(1, [1], 128))


def test_word_writer_stores_what_the_patch_table_says():
    """The generated writer of a template's patches stores, word for word, (pointer + delta) >> shift
    for 16-byte aligned pointers: plain pointers, pointers plus a delta, address fields (shift <= 4,
    folded into the pointer's shift) with deltas of any low bits, a shift past the alignment (not
    folded), pointers near a carry."""
    import random
    patches = ((0, 0, 0, 0), (8, 1, 24, 0), (16, 2, 0, 4), (24, 0, 4096, 4), (32, 1, 40, 4), (40, 2, 8, 4),
               (48, 1, 0, 4), (56, 0, 1 << 20, 0), (64, 2, 16, 5), (72, 0, 24, 3))
    write = launch._word_writer(patches)
    rng = random.Random(0)
    samples = [tuple(rng.randrange(1 << 44) * 16 for _ in range(3)) for _ in range(200)]
    samples += [((1 << 48) - 16, (1 << 40) - 16, 16), (0, 0, 0)]
    for pointers in samples:
        got = ctypes.create_string_buffer(80)
        write(launch._words(got), pointers)
        want = ctypes.create_string_buffer(80)
        for offset, source, delta, shift in patches:
            struct.pack_into("<Q", want, offset, (pointers[source] + delta) >> shift)
        assert got.raw == want.raw, pointers


def test_seen_keys_are_bounded(cheap, monkeypatch):
    """Keys launched once from a template are remembered up to the cache's capacity, then forgotten
    at once (each then costs one more template launch before a launch of its own)."""
    cache = launch.LaunchCache(3)
    monkeypatch.setattr(gemm_ops, "_launches", cache)
    fn, build = GEMMS["dense"]
    fn(*build())
    cheap.take()
    pool = [build() for _ in range(5)]
    sizes = []
    for args in pool:
        fn(*args)
        sizes.append(len(cache._seen))
    assert sizes == [1, 2, 3, 0, 1] and len(cache) == 1
    fn(*pool[4])                    # seen: bound to a launch of its own
    fn(*pool[0])                    # forgotten: the template again
    assert len(cache) == 2 and len(cache._seen) == 1
    assert cheap.take() == {**CHEAP, "launches": 7}


def test_fp32_out_from_a_training_call_is_not_accepted_by_the_bf16_call(cheap):
    """fp8_gemm_nt accepts an fp32 d; gemm_fp8_fp8_bf16_nt does not, also for tensors (at the same
    or new addresses) of a layout fp8_gemm_nt launched."""
    lhs, rhs, d = _dense(out_dtype=torch.float32)()
    deep_gemm.fp8_gemm_nt(lhs, rhs, d)
    with pytest.raises(TypeError, match="^out must be torch.bfloat16, got torch.float32"):
        deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, d)
    lhs, rhs, d = _dense(out_dtype=torch.float32)()
    with pytest.raises(TypeError, match="^out must be torch.bfloat16, got torch.float32"):
        deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, d)


def test_buffers_in_rotation_get_launches_of_their_own(cheap):
    """The first call on each buffer is launched from the template and leaves nothing but its key;
    the second binds a launch of its own, cached; the later ones are launch-cache hits."""
    fn, build = GEMMS["dense"]
    pool = [build() for _ in range(8)]
    fn(*pool[0])
    cheap.take()
    binds, fires = [], []
    with pytest.MonkeyPatch.context() as mp:
        real_bind, real_fire = launch.LaunchTemplate.bind, launch.LaunchTemplate.fire
        mp.setattr(launch.LaunchTemplate, "bind", lambda self, p: binds.append(p) or real_bind(self, p))
        mp.setattr(launch.LaunchTemplate, "fire", lambda self, p: fires.append(p) or real_fire(self, p))
        for args in pool[1:]:
            fn(*args)
            assert cheap.take() == CHEAP
        assert len(fires) == 7 and not binds and len(gemm_ops._launches) == 1
        for args in pool:
            fn(*args)
        assert len(fires) == 7 and len(binds) == 7 and len(gemm_ops._launches) == 8
        for args in pool * 2:
            fn(*args)
        assert len(fires) == 7 and len(binds) == 7
    assert cheap.take() == {**CHEAP, "launches": 24}
    params = {args[2].data_ptr(): p for args, (_, _, p) in zip(pool * 3, cheap.fired[-24:])}
    assert len(params) == 8 and all(hp.int_field(p, "out") == ptr for ptr, p in params.items())


def test_threads_binding_one_template(cheap):
    fn, build = GEMMS["dense"]
    fn(*build())
    pools = [[build() for _ in range(40)] for _ in range(4)]
    want = {}
    for pool in pools:
        for args in pool:
            want[args[2].data_ptr()] = from_scratch(cheap, fn, args)[0][2]
    gemm_ops._launches.clear()
    fn(*build())
    cheap.take()
    errors = []

    def work(pool):
        try:
            for args in pool:
                fn(*args)
        except Exception as exc:  # reported below
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(pool,)) for pool in pools]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    took = cheap.take()
    assert took == {**CHEAP, "launches": 160}
    for _, _, params in cheap.fired[-160:]:
        assert params == want[hp.int_field(params, "out")]


def test_cheap_path_needs_no_driver_call_but_the_launch(cheap, monkeypatch):
    """While the stream captures a CUDA graph a cheap call is one kernel launch: no module load,
    no encode, no graph built or launched."""
    fn, build = GEMMS["dense"]
    fn(*build())
    cheap.take()
    monkeypatch.setattr(launch, "_stream_capturing", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    graphs = cheap.fake.graph_launches
    for _ in range(3):
        args = build()
        fn(*args)
        fn(*args)
    assert cheap.take() == {**CHEAP, "launches": 6} and cheap.fake.graph_launches == graphs


def test_a_layouts_template_launches_through_a_graph_updated_per_call(fake, monkeypatch):
    """Once TEMPLATE_GRAPH_AFTER fires have built it, a template's own launch goes through a graph whose
    kernel node is first given the re-addressed parameters: each launch carries, byte for byte, what
    the long path builds for its tensors, and earlier launches keep theirs."""
    monkeypatch.setattr(fake, "cuTensorMapEncodeTiled", PatchableMaps())
    tma.clear_caches()
    deep_gemm.gemm_fp8_fp8_bf16_nt(*hp.dense_inputs())            # the long path: the layout's template
    calls = [hp.dense_inputs() for _ in range(launch.TEMPLATE_GRAPH_AFTER + 3)]
    for call in calls:
        deep_gemm.gemm_fp8_fp8_bf16_nt(*call)
    assert fake.counts()[:2] == (1, 1)
    assert fake.graph_launches == 3 and fake.node_updates == 3     # the first fires launch the kernel
    launched = [record[4] for record in fake.launches[-len(calls):]]
    assert launched == [hp.uncached_dense_params(*call) for call in calls]
    assert len(set(launched)) == len(calls)


def test_a_template_generates_its_writer_once_hot(fake, monkeypatch):
    """Generating a template's writer compiles Python code, worth it for a hot layout only: the first
    TEMPLATE_GRAPH_AFTER - 1 fires patch in a loop, later ones write through the writer (one per patch
    table), and every launch carries the long path's bytes."""
    monkeypatch.setattr(fake, "cuTensorMapEncodeTiled", PatchableMaps())
    monkeypatch.setattr(launch, "_word_writer", _counting_calls(launch._word_writer))
    tma.clear_caches()
    deep_gemm.gemm_fp8_fp8_bf16_nt(*hp.dense_inputs())
    ((_, template),) = next(iter(gemm_ops._launches._templates.values()))
    calls = [hp.dense_inputs() for _ in range(launch.TEMPLATE_GRAPH_AFTER + 2)]
    for i, call in enumerate(calls):
        deep_gemm.gemm_fp8_fp8_bf16_nt(*call)
        assert (template._write_words is not None) == (i + 1 >= launch.TEMPLATE_GRAPH_AFTER), i
    assert launch._word_writer.calls == 1
    assert [record[4] for record in fake.launches[-len(calls):]] == [hp.uncached_dense_params(*call) for call in calls]


def _counting_calls(fn):
    def counted(*args):
        counted.calls += 1
        return fn(*args)
    counted.calls = 0
    return counted


def test_a_template_without_a_graph_keeps_launching_the_kernel(fake, monkeypatch):
    monkeypatch.setattr(fake, "cuTensorMapEncodeTiled", PatchableMaps())
    monkeypatch.setattr(fake, "cuGraphKernelNodeGetParams", lambda node: (999, None))   # a node it cannot read
    tma.clear_caches()
    deep_gemm.gemm_fp8_fp8_bf16_nt(*hp.dense_inputs())
    graphs = launch.live_graphs()
    calls = [hp.dense_inputs() for _ in range(launch.TEMPLATE_GRAPH_AFTER + 2)]
    for call in calls:
        deep_gemm.gemm_fp8_fp8_bf16_nt(*call)
    assert fake.graph_launches == 0 and launch.live_graphs() == graphs
    assert [record[4] for record in fake.launches[-len(calls):]] == [hp.uncached_dense_params(*call) for call in calls]


# ---- tensor maps: the patch is only used when it reproduces the driver -----------------------------------
def test_maps_are_patched_only_where_the_driver_agrees(cheap):
    maps = cheap.maps
    tma.clear_caches()
    shape = ("u8", (384, 128), (384,), (128, 128), 128)
    base = 0x7F00_1234_5600
    first = tma.tensor_map(base, *shape)
    assert maps.encodes == 2                                  # the map, then the probe
    assert tma._field == (ADDRESS_AT, 4)
    for address in (base + 16, base + (1 << 30) + 0x1230, 0x10):
        encodes = maps.encodes
        assert tma.tensor_map(address, *shape) == tma.encode(address, *shape)
        assert maps.encodes == encodes + 1                    # (the comparison's own encode)
        assert tma.address_field(tma.encode(address, *shape), address) == (ADDRESS_AT, 4)
    assert tma.address_field(first, base + 16) is None       # not this map's address
    assert tma.address_field(bytes(128), 0) is None          # not a map of a checked shape


@pytest.mark.parametrize("how", ["checksum", "refuse"])
def test_unpatchable_maps_keep_the_long_path(cheap, how):
    """A driver whose maps hold the address elsewhere too, or that refuses addresses it does not
    know: every map is encoded, no template is made, every call on new tensors is validated and
    launches the long path's parameters."""
    setattr(cheap.maps, how, True)
    tma.clear_caches()
    gemm_ops._launches.clear()
    fn, build = GEMMS["dense"]
    kept = []   # every call's tensors stay alive: new addresses each time (a reused one could hit)
    for _ in range(3):
        args = build()
        kept.append(args)
        fn(*args)
        took = cheap.take()
        assert took["validations"] == 1 and took["encodes"] >= 3
        assert cheap.fired[-1] == from_scratch(cheap, fn, args)[0]
    assert tma._field is None and not gemm_ops._launches._templates


def test_the_default_fake_driver_maps_are_not_patchable(fake):
    """tests/test_host_path.py's fake digests every argument, the address included: its maps are
    never patched, so its tests see the long path for every new address, as before templates."""
    tma.clear_caches()
    lhs, rhs, out = hp.dense_inputs()
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, torch.empty_like(out))
    assert fake.counts() == (2, 2, 2) and not gemm_ops._launches._templates


def test_templates_are_bounded(cheap, monkeypatch):
    cache = launch.LaunchCache(3)
    monkeypatch.setattr(gemm_ops, "_launches", cache)
    for m in range(8, 80, 8):
        deep_gemm.gemm_fp8_fp8_bf16_nt(*_dense(m=m)())
        assert len(cache._templates) <= 3 and len(cache) <= 3
    cache.clear()
    assert not cache._templates and not len(cache)


# ---- GPU: the real driver ---------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_tensor_maps_patch_exactly():
    """On this driver, every map shape the GEMMs use passes the check, and patched maps equal
    encodes at addresses inside real allocations."""
    tma.clear_caches()
    x = torch.empty(1 << 26, dtype=torch.uint8, device="cuda")   # holds every map below at every offset
    base = x.data_ptr()
    shapes = [("u8", (7168, 4096), (7168,), (128, 128), 128), ("u8", (128, 200, 56), (7168, 128), (128, 200, 2), 128),
              ("f32", (132, 56), (528,), (128, 1), 0), ("bf16", (2112, 128), (4224,), (64, 64), 128),
              ("f32", (96, 128, 4), (384, 49152), (32, 64, 1), 128)]
    for shape in shapes:
        tma.tensor_map(base, *shape)
    assert tma._field is not None, "this driver's maps cannot be patched: the cheap path is off"
    for shape in shapes:
        for offset in (16, 4096 + 48, (1 << 23) + 1024):
            assert tma.tensor_map(base + offset, *shape) == tma.encode(base + offset, *shape), (shape, offset)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["dense", "wgrad", "contiguous", "masked", "k_grouped", "k_grouped_device"])
def test_gpu_new_tensors_take_the_cheap_path_and_are_right(name, monkeypatch):
    monkeypatch.setattr(gemm_ops, "_launches", launch.LaunchCache())   # the layout's template made here,
    monkeypatch.setattr(launch, "TEMPLATE_GRAPH_AFTER", 2)              # in a graph from its third call on
    validations = []
    for fn_name in ("check_gemm", "check_k_grouped"):
        real = getattr(gemm_ops, fn_name)
        monkeypatch.setattr(gemm_ops, fn_name, lambda *a, _real=real, **k: validations.append(1) or _real(*a, **k))
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).cuda()

    def build():
        if name in ("dense", "wgrad"):
            m, n, k = (200, 2112, 896) if name == "dense" else (256, 512, 1024)
            lhs = deep_gemm.per_token_cast_to_fp8(rand(m, k).bfloat16())
            rhs = (deep_gemm.per_block_cast_to_fp8 if name == "dense" else deep_gemm.per_token_cast_to_fp8)(
                rand(n, k).bfloat16())
            out = torch.zeros(m, n, device="cuda", dtype=torch.bfloat16 if name == "dense" else torch.float32)
            fn = deep_gemm.gemm_fp8_fp8_bf16_nt if name == "dense" else deep_gemm.wgrad_gemm_fp8_fp8_fp32_nt
            return fn, (lhs, rhs, out)
        if name == "contiguous":
            lhs = deep_gemm.per_token_cast_to_fp8(rand(256, 512).bfloat16())
            rhs = deep_gemm.per_block_cast_to_fp8(rand(2, 256, 512).bfloat16())
            idx = (torch.arange(256, device="cuda", dtype=torch.int32) // 128)
            return deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous, (lhs, rhs, torch.zeros(
                256, 256, device="cuda", dtype=torch.bfloat16), idx)
        if name == "masked":
            lhs = deep_gemm.per_token_cast_to_fp8(rand(2, 64, 512).bfloat16())
            rhs = deep_gemm.per_block_cast_to_fp8(rand(2, 256, 512).bfloat16())
            mm = torch.tensor([64, 17], device="cuda", dtype=torch.int32)
            return deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked, (lhs, rhs, torch.zeros(
                2, 64, 256, device="cuda", dtype=torch.bfloat16), mm, 32)
        ks = [128, 0, 256, 48]
        xs = [rand(sum(ks), 128).bfloat16(), rand(sum(ks), 96).bfloat16()]
        a, b = (deep_gemm.k_grouped_per_token_cast_to_fp8_transposed(x, ks) for x in xs)
        sizes = torch.tensor(ks, dtype=torch.int32, device="cuda") if name == "k_grouped_device" else ks
        return deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt, (a, b, torch.zeros(4, 128, 96, device="cuda"), sizes)

    fn, args = build()
    fn(*args)
    for _ in range(5):   # from the third on, through the template's graph
        fn, args = build()
        expected = [t.clone() if isinstance(t, torch.Tensor) else t for t in args]
        before = len(validations)
        fn(*args)
        assert len(validations) == before, "the call on new tensors went the long way"
        torch.cuda.synchronize()
        saved = gemm_ops._launches
        gemm_ops._launches = launch.LaunchCache()
        try:
            fn(*expected)        # the long path on the same values
        finally:
            gemm_ops._launches = saved
        got, want = args[2], expected[2]
        assert reference.calc_diff(got.float(), want.float()) < 1e-9 and not got.isnan().any()
    templates = [template for entries in gemm_ops._launches._templates.values() for _, template in entries]
    templates = [t for template in templates for t in getattr(template, "templates", (template,))]   # chains'
    assert any(template._own._graph is not None for template in templates), "no template launched through a graph"


@pytest.mark.gpu
def test_gpu_casts_on_new_inputs_are_bit_identical():
    for fn, ref, shape in ((deep_gemm.per_token_cast_to_fp8, reference.per_token_cast_to_fp8, (128, 7168)),
                           (deep_gemm.per_block_cast_to_fp8, reference.per_block_cast_to_fp8, (256, 7168)),
                           (deep_gemm.per_token_cast_to_fp8_transposed, reference.per_token_cast_to_fp8_transposed,
                            (4096, 2048))):
        fn(torch.randn(shape, device="cuda", dtype=torch.bfloat16))
        before = cast_ops.launch_count
        for _ in range(3):
            x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
            q, s = fn(x)
            q_ref, s_ref = ref(x)
            assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
        assert cast_ops.launch_count == before + 3


# ---- the benchmark of these paths (bench --suite host / train_step), on the fake driver ----------------
def test_bench_host_suites_run_on_the_fake_driver(cheap, monkeypatch):
    """bench_host's code paths, with CPU tensors, small MoE dimensions and no GPU timing: every
    pattern runs and the "new" and "M changing" patterns take the cheap path."""
    from deep_gemm import bench_host
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = bench_host.time.perf_counter()

        def elapsed_time(self, other):
            return (other.t - self.t) * 1e3
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: None)
    for name, value in (("HIDDEN", 256), ("INTERMEDIATE", 128), ("TOKENS", 512)):
        monkeypatch.setattr(bench_host, name, value)
    cpu = torch.device("cpu")
    views = bench_host.views((4, 32), FP8, 3, cpu)
    assert len({v.data_ptr() for v in views}) == 3 and all(v.data_ptr() % 16 == 0 for v in views)
    assert bench_host.batch_sizes(1000) == [1000, 880, 760, 640, 520, 400, 280, 160]
    assert bench_host.batch_sizes(64) == [64, 56, 48, 40, 32, 24, 16, 8]

    validations = []
    real = gemm_ops.check_gemm
    monkeypatch.setattr(gemm_ops, "check_gemm", lambda *a, **k: validations.append(a[0]) or real(*a, **k))
    dense = bench_host.bench_dense_host(shapes=((64, 256, 384), (200, 512, 256)), calls=12, device=cpu)
    # Per shape: the layout's first call, then each other batch size once (the first is the shape's
    # own M); nothing else is validated.
    assert len(validations) == 2 * (1 + 7), validations
    for row in dense:
        assert set(row["ours"]) == set(bench_host.PATTERNS)
        assert "unavailable" in row["cublaslt"] or set(row["cublaslt"]) == set(bench_host.PATTERNS)
    monkeypatch.setattr(bench_host, "_other_calls", lambda device, calls: {
        "dense": [lambda args=_dense()(): deep_gemm.gemm_fp8_fp8_bf16_nt(*args) for _ in range(calls + 1)]})
    other = bench_host.bench_other_host(calls=5, device=cpu)
    bench_host.print_host(dense, other, 12)
    assert set(bench_host.host_summary(dense, other)) == {"worst_us", "met"}
    rows = bench_host.bench_train_step(steps=3, warmup=2, device=cpu)
    bench_host.print_train_step(rows)
    assert [r["routing"] for r in rows] == ["fixed", "new every step"] and all(r["calls"] == 18 for r in rows)


def test_bench_names_the_host_suites_apart_from_all():
    from deep_gemm import bench
    parser = bench.build_parser()
    assert parser.parse_args(["--suite", "host"]).suite == "host"
    assert parser.parse_args(["--suite", "train_step"]).suite == "train_step"
    source = open(bench.__file__).read()
    assert 'all_suites = ["dense", "odd", "contiguous", "masked", "wgrad", "casts"]' in source
