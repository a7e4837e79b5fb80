"""What the benchmark modules share: the peers timed and their names, and the geometric mean that
every summary uses (bench.py and bench_sweep.py import it; it imports nothing of the package)."""
from __future__ import annotations

import math
from typing import Optional

PEERS = ("ours", "cublaslt", "triton")
PEER_TITLES = {"ours": "ours", "cublaslt": "cuBLASLt", "triton": "Triton"}


def geomean(values) -> Optional[float]:
    """Geometric mean of the positive, finite values (None when there are none)."""
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None
