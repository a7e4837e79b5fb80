"""Development check: resident clusters and timing with and without the occupancy cap."""
import dataclasses
import torch
import deep_gemm
from deep_gemm import plan
from deep_gemm.bench import Timer
from deep_gemm.runtime import kernels as rk

timer = Timer("cuda", 20)
for (m, n, k), changes in [((4096, 7168, 2048), dict(block_n=128, cluster_n=2)),
                           ((4096, 7168, 2048), dict(block_n=128, cluster_n=1)),
                           ((64, 2112, 7168), dict(block_n=128, split_k=4)),
                           ((64, 2112, 7168), dict(block_n=64, split_k=2)),
                           ((64, 2112, 7168), dict(block_n=32, split_k=8))]:
    base = plan.plan_dense(m, n, k, 132)
    cfg = dataclasses.replace(base, **changes, num_stages=plan.max_stages(base.block_m, changes["block_n"],
                                                                          split_k=changes.get("split_k", 1)))
    a = deep_gemm.per_token_cast_to_fp8(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
    b = deep_gemm.per_block_cast_to_fp8(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    kern = rk.gemm_kernel(cfg, 0)
    for cap in (kern.max_active_clusters, None):
        kern.max_active_clusters = cap
        call = lambda: rk.launch_gemm(cfg, a=a[0], a_rows=m, sa=a[1], sa_rows=m, sa_cols=a[1].shape[-1], b=b[0],
                                      b_rows=n, sb=b[1], out=out, out_rows=m, shape_m=m, group_info=None, num_sms=132)
        call()
        us, _ = timer.kernel_us(call)
        print(f"{m}x{n}x{k} {changes} smem={cfg.smem_bytes} max_active_clusters={cap} -> {us:.1f} us", flush=True)
