"""Warm-up numbers on a GPU machine (issue: first call from the disk cache, 8 processes racing).

    python scripts/warmup_check.py
1. Eight processes start together on one empty cache and each run the same three GEMM shapes:
   all must succeed and every kernel must be compiled exactly once (DG_JIT_DEBUG lines).
2. A fresh process whose kernels are in the disk cache: time of its first call of a shape
   (cache read + module load + tensor maps + launch), after a warm-up of CUDA itself.
"""
import os
import subprocess
import sys
import tempfile
import time

SHAPES = [(128, 7168, 2048), (4096, 4096, 7168), (64, 2112, 7168)]
CHILD = r'''
import sys, time, torch, deep_gemm
shapes = eval(sys.argv[1])
torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
inputs = []
for m, n, k in shapes:
    lhs = deep_gemm.per_token_cast_to_fp8(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
    rhs = deep_gemm.per_block_cast_to_fp8(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
    inputs.append((lhs, rhs))
torch.cuda.synchronize()
for (m, n, k), (lhs, rhs) in zip(shapes, inputs):
    t = time.perf_counter()
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs)
    torch.cuda.synchronize()
    print(f"first call {m}x{n}x{k}: {(time.perf_counter() - t) * 1e3:.1f} ms", flush=True)
'''


def run_children(count, cache, debug):
    env = dict(os.environ, DG_JIT_CACHE_DIR=cache, DG_JIT_DEBUG="1" if debug else "0")
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, repr(SHAPES)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(count)]
    return [(p.wait(), p.stdout.read(), p.stderr.read()) for p in procs]


def main():
    cache = tempfile.mkdtemp(prefix="dg_warmup_")
    t = time.perf_counter()
    results = run_children(8, cache, debug=True)
    wall = time.perf_counter() - t
    ok = all(code == 0 for code, _, _ in results)
    stderr = "".join(err for _, _, err in results)
    compiles = stderr.count("] compiled ")
    print(f"8 processes on a cold cache: {'all succeeded' if ok else 'FAILED'} in {wall:.1f} s; "
          f"{compiles} compilations for {len(SHAPES)} GEMM kernels (+ casts if any)")
    if not ok:
        print(stderr[-3000:])
    code, out, err = run_children(1, cache, debug=False)[0]
    print("fresh process, kernels in the disk cache:\n" + out + (err[-2000:] if code else ""))
    return 0 if ok and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
