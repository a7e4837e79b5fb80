"""What the benchmark modules share: the peers timed and their names, the grouped cases' seeds, the
geometric mean that every summary uses and a figure's last steps (bench.py, bench_bf16.py and
bench_sweep.py import it; it imports nothing of the package)."""
from __future__ import annotations

import math
from typing import Optional

PEERS = ("ours", "cublaslt", "triton")
PEER_TITLES = {"ours": "ours", "cublaslt": "cuBLASLt", "triton": "Triton"}


def contiguous_seed(groups: int, m_per_group: int, n: int, k: int) -> int:
    """A contiguous case's own seed (its group sizes and data)."""
    return groups * 7919 + m_per_group * 31 + n + k


def masked_seed(groups: int, expected_m: int, n: int, k: int) -> int:
    """A masked case's own seed (its group sizes and data)."""
    return groups * 7907 + expected_m * 37 + n + k


def k_grouped_seed(groups: int, m: int, n: int, avg_k: int) -> int:
    """A K-grouped case's own seed (its group sizes and data)."""
    return groups * 7901 + m * 31 + n + avg_k


def geomean(values) -> Optional[float]:
    """Geometric mean of the positive, finite values (None when there are none)."""
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def save_figure(fig, title: str, path: str, dpi: int) -> None:
    """Title, lay out, write and close a matplotlib figure."""
    import matplotlib.pyplot as plt
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
