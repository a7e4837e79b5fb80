"""What the benchmark modules share: the peers timed and their names, the geometric mean that every
summary uses and a figure's last steps (bench.py and bench_sweep.py import it; it imports nothing of
the package)."""
from __future__ import annotations

import math
from typing import Optional

PEERS = ("ours", "cublaslt", "triton")
PEER_TITLES = {"ours": "ours", "cublaslt": "cuBLASLt", "triton": "Triton"}


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
