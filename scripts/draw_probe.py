"""How much the random group sizes move a grouped bench row (its "vs DG" is a TFLOPS ratio).

    PYTHONPATH=. python3 scripts/draw_probe.py [draws]
The bench draws each group's rows from 0.7-1.3 x the expected M with one fixed seed per case, and
DeepGEMM's ANCHORS.md times come from its own draw. This builds the same cases as the bench with
other seeds, times our call the bench's way (L2 written over before each call, median of the
profiler's kernel times), checks it against float64, and prints TFLOPS per draw against DeepGEMM's.
"""
import statistics
import sys

import torch

from deep_gemm import bench

CASES = [(bench.make_masked, (2, 512, 4096, 7168)), (bench.make_masked, (32, 32, 7168, 2048)),
         (bench.make_masked, (32, 32, 4096, 7168)), (bench.make_masked, (1, 1024, 4096, 7168)),
         (bench.make_contiguous, (4, 8192, 4096, 7168)), (bench.make_contiguous, (8, 4096, 4096, 7168))]


def main():
    draws = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    timer = bench.Timer("cuda", 20)
    for make, case in CASES:
        ratios = []
        for seed in range(1000, 1000 + draws):
            problem = make(*case, "cuda", seed=seed)
            fn = problem.peers["ours"]()
            problem.poison()
            diff = problem.check(fn())
            us, _ = timer.kernel_us(fn)
            tflops = problem.flops / us / 1e6
            ratios.append(tflops / problem.deepgemm_tflops)   # DeepGEMM's TFLOPS on its own draw
            if seed == 1000:
                print(f"{problem.suite} {problem.label} (DeepGEMM {problem.deepgemm_tflops} TFLOPS):")
            print(f"  draw {seed - 1000}: {problem.shape['valid_m']:6d} rows  {us:8.1f} us  {tflops:6.0f} TFLOPS"
                  f"  {ratios[-1]:5.2f}x DG  (calc_diff {diff:.1e})")
            del problem, fn
            torch.cuda.empty_cache()
        print(f"  median over draws: {statistics.median(ratios):.2f}x DG "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
