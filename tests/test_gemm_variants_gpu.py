"""Kernel features forced through prepare_gemm, whatever the planner picks today: split-K (units
over shares of K, summed through the stream's workspace), 256-row tiles, wide tiles over two
scale blocks of B, the scale loader warp and several K blocks a stage, on odd shapes, checked
against float64."""
import dataclasses

import pytest
import torch

import deep_gemm
from deep_gemm import plan
from deep_gemm.config import max_stages
from deep_gemm.reference import calc_diff, dequantize_lhs, dequantize_rhs
from deep_gemm.runtime.kernels import prepare_gemm

pytestmark = pytest.mark.gpu


def _inputs(m, n, k):
    lhs = deep_gemm.per_token_cast_to_fp8(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
    rhs = deep_gemm.per_block_cast_to_fp8(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
    ref = dequantize_lhs(*lhs, dtype=torch.float64) @ dequantize_rhs(*rhs, dtype=torch.float64).T
    return lhs, rhs, ref


def _launch(config, lhs, rhs, out, num_sms=None):
    m = lhs[0].shape[0]
    prepare_gemm(config, a=lhs[0], a_rows=m, sa=lhs[1], sa_rows=m, b=rhs[0], b_rows=rhs[0].shape[0], sb=rhs[1],
                 out=out, out_rows=m, shape_m=m, group_info=None,
                 num_sms=num_sms or deep_gemm.get_num_sms()).fire()


def forced(m, n, k, **changes):
    """The planner's dense config for (m, n, k) on 132 SMs, with `changes`: unpipelined, unsplit,
    A's scales by TMA and one K block a stage unless they say otherwise, and as many stages as fit
    (at most 8 K blocks' worth) unless num_stages is given. KernelConfig rejects invalid results."""
    base = plan.plan_dense(m, n, k, 132)
    changes = {"pipelined": False, "split_k": 1, "scale_loader_warp": False, "stage_k_blocks": 1, **changes}
    stage_k_blocks = changes["stage_k_blocks"]
    changes.setdefault("num_stages", max_stages(changes.get("block_m", base.block_m),
                                                changes.get("block_n", base.block_n),
                                                cap=max(1, 8 // stage_k_blocks), stage_k_blocks=stage_k_blocks))
    return dataclasses.replace(base, **changes)


VARIANTS = [
    # Split-K.
    (64, 2112, 7168, dict(block_n=128, split_k=4)),
    (64, 2112, 7168, dict(block_n=64, split_k=4, pipelined=True)),
    (128, 2112, 7168, dict(block_n=64, split_k=2)),
    (200, 1040, 12800, dict(block_n=32, split_k=3, pipelined=True)),  # 2 M blocks, > 32 K blocks per share
    (77, 512, 576, dict(block_n=32, split_k=8)),              # 5 K blocks for 8 splits: empty shares
    (1000, 2112, 7168, dict(block_n=128, split_k=4, pipelined=True)),  # 132 whole tiles, then 4 split ones
    # 256-row tiles (dense, unpipelined, unsplit).
    (300, 4000, 7168, dict(block_m=256, block_n=128)),        # 2nd M block has 44 rows
    (4097, 2112, 576, dict(block_m=256, block_n=128)),        # 17 M blocks, last one a single row
    (513, 1000, 384, dict(block_m=256, block_n=64)),          # narrow tiles, partial N block
    (1, 256, 128, dict(block_m=256, block_n=128)),            # one row of one tile
    (300, 1001, 4352, dict(block_m=256, block_n=128)),        # odd N: the last column stored alone
    # A's scales by the loader warp (cp.async, zero-filled past M) on other tiles than BLOCK_N = 16:
    (1, 256, 128, dict(block_n=16, scale_loader_warp=True)),
    (77, 512, 576, dict(block_n=32, split_k=8, scale_loader_warp=True)),  # M % 4 = 1, empty shares
    (300, 4000, 7168, dict(block_m=256, block_n=128, scale_loader_warp=True)),  # two pieces per lane
    (1000, 2112, 7168, dict(block_n=128, split_k=4, pipelined=True, scale_loader_warp=True)),
    # The loader warp's ring wrapping many times: BLOCK_N = 16 over K >= 4096 on a short ring,
    # 2 tiles per block (64 K blocks through 4 stages) with a partial last M block, and pipelined.
    (200, 2112, 4096, dict(block_n=16, scale_loader_warp=True, num_stages=4)),
    (64, 2112, 4608, dict(block_n=16, pipelined=True, scale_loader_warp=True, num_stages=3)),
    # Several K blocks a stage (3-D boxes): tail boxes of M rounded up to 8 rows, an odd number
    # of K blocks (the last stage half past K), split shares that end inside a stage, two waves.
    (64, 2112, 7168, dict(block_n=16, pipelined=True, scale_loader_warp=True, stage_k_blocks=2)),
    (1, 2112, 7168, dict(block_n=16, pipelined=True, scale_loader_warp=True, stage_k_blocks=4)),
    (7, 4096, 4480, dict(block_n=32, pipelined=True, stage_k_blocks=2)),        # 35 K blocks
    (7, 4096, 4480, dict(block_n=32, scale_loader_warp=True, stage_k_blocks=2)),  # unpipelined, loader warp
    (100, 1040, 12800, dict(block_n=32, split_k=3, pipelined=True, stage_k_blocks=4)),
    (77, 512, 4352, dict(block_n=32, split_k=5, stage_k_blocks=4, scale_loader_warp=True)),
    (1000, 2112, 7168, dict(block_n=128, split_k=4, pipelined=True, stage_k_blocks=2)),
    (300, 4000, 7168, dict(block_m=256, block_n=128, stage_k_blocks=2)),      # 2nd M block: 44 rows -> 48
    # An odd number of K blocks in the pipelined loop (its bound hidden from the compiler).
    (1000, 2112, 1408, dict(block_n=128, pipelined=True)),
    (200, 1040, 4224, dict(block_n=64, split_k=3, pipelined=True)),          # 33 K blocks, split shares
    # Tiles over two scale blocks of B (run-time split column): N blocks at every split, partial
    # last ones.
    (333, 2112, 896, dict(block_n=192)),                      # splits 128 and 64; 7 K blocks
    (300, 1000, 2048, dict(block_n=160)),                     # 128, 96, 64, 32
    (200, 2112, 1408, dict(block_n=144)),                     # all eight
    (64, 1001, 576, dict(block_m=64, block_n=96)),            # 96, 64, 32; odd N
    (77, 2112, 576, dict(block_m=64, block_n=96, pipelined=True)),
    # 140 tiles of 128 x 160: 132 whole, 8 split in 4 units of 8-9 K blocks (a wide tile's reduction).
    (1200, 2112, 4224, dict(block_n=160, split_k=4)),
]


@pytest.mark.parametrize("m,n,k,changes", VARIANTS, ids=str)
def test_forced_variant_matches_float64(m, n, k, changes):
    config = forced(m, n, k, **changes)
    for name, value in changes.items():
        assert getattr(config, name) == value
    lhs, rhs, ref = _inputs(m, n, k)
    # Rows 16-byte aligned, as the public function stages them for odd N; the padding columns
    # must stay untouched.
    padded = torch.full((m, (n + 7) // 8 * 8), float("nan"), device="cuda", dtype=torch.bfloat16)
    out = padded[:, :n]
    _launch(config, lhs, rhs, out)
    assert not torch.isnan(out).any()
    assert calc_diff(out, ref) < 1e-5
    assert torch.isnan(padded[:, n:]).all()


@pytest.mark.parametrize("m", [1, 64, 128])
def test_planner_loader_warp_ring_wraps_across_tiles(m):
    """The planner's decode kernel for N = 2112, K = 7168 on 132 SMs (16-column tiles, A's scales
    by the loader warp, two K blocks a stage) on 16 blocks: each runs ~8 tiles of 28 stages
    through its ring of 10 (or 5) stages, so the full/empty barriers' phases wrap many times.
    Then the public function on the same problem (that very kernel on a 132-SM H100)."""
    n, k = 2112, 7168
    config = plan.plan_dense(m, n, k, 132)
    assert config.scale_loader_warp and config.block_n == 16 and config.stage_k_blocks == 2
    lhs, rhs, ref = _inputs(m, n, k)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    _launch(config, lhs, rhs, out, num_sms=16)
    assert not torch.isnan(out).any()
    assert calc_diff(out, ref) < 1e-5
    out.fill_(float("nan"))
    assert deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out) is out
    assert not torch.isnan(out).any()
    assert calc_diff(out, ref) < 1e-5


@pytest.mark.parametrize("num_sms", [132, 16], ids=lambda s: f"sms{s}")
def test_split_k_is_deterministic_and_reusable(num_sms):
    """Split-K sums its partials in split order: launches give bit-identical results whichever
    unit arrives last, the workspace counters are back at zero after each launch (or the next
    one would skip or double a tile). 132 blocks: 33 tiles x 4 units; 16 blocks: two waves of
    whole tiles, then the 33rd tile in 4 units."""
    m, n, k = 64, 2112, 7168
    config = forced(m, n, k, block_n=64, split_k=4, pipelined=True, scale_loader_warp=True)
    lhs, rhs, ref = _inputs(m, n, k)
    results = []
    for _ in range(3):
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        _launch(config, lhs, rhs, out, num_sms)
        results.append(out)
    assert calc_diff(results[0], ref) < 1e-5
    for other in results[1:]:
        assert torch.equal(other.view(torch.int16), results[0].view(torch.int16))


def test_split_k_on_two_streams_at_once():
    """Two split-K GEMMs in flight on two streams use separate workspaces."""
    m, n, k = 64, 2112, 7168
    config = forced(m, n, k, block_n=64, split_k=4, pipelined=True, scale_loader_warp=True)
    problems = [_inputs(m, n, k) for _ in range(2)]
    outs = [torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16) for _ in problems]
    streams = [torch.cuda.Stream() for _ in problems]
    torch.cuda.synchronize()
    for _ in range(5):
        for (lhs, rhs, _), out, stream in zip(problems, outs, streams):
            with torch.cuda.stream(stream):
                _launch(config, lhs, rhs, out)
    torch.cuda.synchronize()
    for (_, _, ref), out in zip(problems, outs):
        assert calc_diff(out, ref) < 1e-5


def test_split_k_workspace_made_during_capture_also_serves_eager_calls():
    """A stream's workspace first allocated while that stream captures a graph is zeroed at once
    (not by a memset recorded into the graph): an eager call on that stream before any replay
    must find its counters at zero."""
    m, n, k = 64, 2112, 7168
    config = forced(m, n, k, block_n=64, split_k=4, pipelined=True, scale_loader_warp=True)
    lhs, rhs, ref = _inputs(m, n, k)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    _launch(config, lhs, rhs, out)                      # loads the kernel (capture cannot)
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        _launch(config, lhs, rhs, out)
    eager = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    with torch.cuda.stream(stream):
        _launch(config, lhs, rhs, eager)
    stream.synchronize()
    assert calc_diff(eager, ref) < 1e-5
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert calc_diff(out, ref) < 1e-5
