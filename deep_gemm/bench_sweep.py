"""`python -m deep_gemm bench --suite sweep` (issue #23): dense FP8 GEMMs of popular models' linear
layers, M from 1 to 8192 on a log scale, ours beside cuBLASLt and Triton.

Every shape is a bench.make_dense Problem timed by bench.measure, so the table, the JSON rows and
the floor are the bench's own. This module adds the shape list, the sweep's summary (geomean % of
the roofline floor per peer, overall and per M band; the shapes where a peer beats us; the worst
ten) and its plot (% of floor against M, one panel per layer).

Layer shapes: the table above LAYERS. A layer shared by two models (same N and K) is one family,
labelled with both.
"""
from __future__ import annotations

import math
import sys
from typing import Dict, List, Optional, Tuple

from .bench_common import PEER_TITLES, PEERS, geomean, save_figure

# Each model's linear layers as N (output features) x K (input features), fused projections as
# serving stacks run them, from the values of its config.json:
# | model           | config                                               | layers: N x K                           |
# |-----------------|------------------------------------------------------|-----------------------------------------|
# | Llama-3 8B      | hidden 4096, intermediate 14336, 32 heads, 8 KV      | qkv 6144x4096, o 4096x4096,             |
# |                 | heads, head_dim 128                                  | gate_up 28672x4096, down 4096x14336     |
# | Llama-3 70B     | hidden 8192, intermediate 28672, 64 heads, 8 KV      | qkv 10240x8192, o 8192x8192,            |
# |                 | heads, head_dim 128                                  | gate_up 57344x8192, down 8192x28672     |
# | Qwen2.5 7B      | hidden 3584, intermediate 18944, 28 heads, 4 KV      | qkv 4608x3584, o 3584x3584,             |
# |                 | heads, head_dim 128                                  | gate_up 37888x3584, down 3584x18944     |
# | Qwen3 32B       | hidden 5120, intermediate 25600, 64 heads, 8 KV      | qkv 10240x5120, o 5120x8192,            |
# |                 | heads, head_dim 128                                  | gate_up 51200x5120, down 5120x25600     |
# | Qwen3 235B-A22B | hidden 4096, moe_intermediate 1536, 64 heads, 4 KV   | qkv 9216x4096, o 4096x8192, expert      |
# |                 | heads, head_dim 128, 128 experts                     | gate_up 3072x4096, expert down 4096x1536|
# | DeepSeek-V3     | dim 7168, q_lora_rank 1536, kv_lora_rank 512, 128    | q_a 1536x7168, q_a+kv_a 2112x7168,      |
# |                 | heads (qk_nope 128 + qk_rope 64, v 128), inter_dim   | q_b 24576x1536, kv_a 576x7168,          |
# |                 | 18432, moe_inter_dim 2048, 256 routed + 1 shared     | kv_b 32768x512, o 7168x16384, dense     |
# |                 | expert, vocab 129280                                 | gate_up 36864x7168, down 7168x18432,    |
# |                 |                                                      | expert gate_up 4096x7168, down          |
# |                 |                                                      | 7168x2048, vocab head 129280x7168       |
# | Mixtral 8x7B    | hidden 4096, intermediate 14336, 8 experts           | expert w1 (= w3) 14336x4096,            |
# |                 |                                                      | w2 4096x14336 (= Llama-3 8B down)       |
# | gpt-oss 120b    | hidden 2880, intermediate 2880, 64 heads, 8 KV heads,| qkv 5120x2880, o 2880x4096, expert      |
# |                 | head_dim 64, 128 experts (4 per token)               | gate_up 5760x2880, down 2880x2880       |
# (K = 2880 is not a multiple of 128: those rows also exercise K padding.)
# (model, layer, N, K)
LAYERS: Tuple[Tuple[str, str, int, int], ...] = (
    ("Llama-3 8B", "qkv", 6144, 4096),
    ("Llama-3 8B", "o", 4096, 4096),
    ("Llama-3 8B", "gate_up", 28672, 4096),
    ("Llama-3 8B", "down", 4096, 14336),
    ("Llama-3 70B", "qkv", 10240, 8192),
    ("Llama-3 70B", "o", 8192, 8192),
    ("Llama-3 70B", "gate_up", 57344, 8192),
    ("Llama-3 70B", "down", 8192, 28672),
    ("Qwen2.5 7B", "qkv", 4608, 3584),
    ("Qwen2.5 7B", "o", 3584, 3584),
    ("Qwen2.5 7B", "gate_up", 37888, 3584),
    ("Qwen2.5 7B", "down", 3584, 18944),
    ("Qwen3 32B", "qkv", 10240, 5120),
    ("Qwen3 32B", "o", 5120, 8192),
    ("Qwen3 32B", "gate_up", 51200, 5120),
    ("Qwen3 32B", "down", 5120, 25600),
    ("Qwen3 235B-A22B", "qkv", 9216, 4096),
    ("Qwen3 235B-A22B", "o", 4096, 8192),
    ("Qwen3 235B-A22B", "expert gate_up", 3072, 4096),
    ("Qwen3 235B-A22B", "expert down", 4096, 1536),
    ("DeepSeek-V3", "q_a", 1536, 7168),
    ("DeepSeek-V3", "q_a+kv_a", 2112, 7168),
    ("DeepSeek-V3", "q_b", 24576, 1536),
    ("DeepSeek-V3", "kv_a", 576, 7168),
    ("DeepSeek-V3", "kv_b", 32768, 512),
    ("DeepSeek-V3", "o", 7168, 16384),
    ("DeepSeek-V3", "dense gate_up", 36864, 7168),
    ("DeepSeek-V3", "dense down", 7168, 18432),
    ("DeepSeek-V3", "expert+shared gate_up", 4096, 7168),
    ("DeepSeek-V3", "expert+shared down", 7168, 2048),
    ("DeepSeek-V3", "vocab head", 129280, 7168),
    ("Mixtral 8x7B", "expert w1", 14336, 4096),
    ("Mixtral 8x7B", "expert w2", 4096, 14336),
    ("gpt-oss 120b", "qkv", 5120, 2880),
    ("gpt-oss 120b", "o", 2880, 4096),
    ("gpt-oss 120b", "expert gate_up", 5760, 2880),
    ("gpt-oss 120b", "expert down", 2880, 2880),
)
MODELS = tuple(dict.fromkeys(model for model, _, _, _ in LAYERS))

# M on a log scale, 1 to 8192, with values that are not multiples of 8 or 64 (3, 5, 13, 65, 100,
# 200, 333, 1000, 3000, 6000) beside the powers of two and the usual batch sizes.
SWEEP_MS = (1, 2, 3, 5, 8, 13, 16, 24, 32, 48, 64, 65, 96, 100, 128, 200, 256, 333, 512, 768, 1000, 1024,
            1536, 2048, 3000, 4096, 6000, 8192)
STRIDE = 6              # each family takes every STRIDE-th M, its offset rotating from family to family,
# so every family spans decode to prefill and every M is run on several families.
# Ms every family of these layers also runs (the cases: narrow N at mid M, the vocabulary
# head at M = 1024, decode on K = 576 / N = 2112 rows).
EXTRA_MS: Dict[Tuple[int, int], Tuple[int, ...]] = {
    (1536, 7168): (256, 1024), (2112, 7168): (64, 256, 512, 1024), (576, 7168): (64,),
    (129280, 7168): (1024,), (3072, 4096): (256, 512),
}
SWEEP_ITERS = 20        # timed calls per shape unless --iters (keeps ~190 shapes x 3 peers to minutes)
BANDS = (("1-64", 1, 64), ("65-512", 65, 512), ("513-2048", 513, 2048), (">2048", 2049, None))
WORST = 10


def families() -> List[dict]:
    """One entry per distinct (N, K): {"n", "k", "family": "model layer[ / model layer]", "models"}."""
    merged: Dict[Tuple[int, int], dict] = {}
    for model, layer, n, k in LAYERS:
        f = merged.setdefault((n, k), {"n": n, "k": k, "names": [], "models": []})
        f["names"].append(f"{model} {layer}")
        f["models"].append(model)
    return [{"n": f["n"], "k": f["k"], "family": " / ".join(f["names"]), "models": f["models"]}
            for f in merged.values()]


def sweep_shapes(quick: bool = False) -> List[dict]:
    """The sweep: [{"m", "n", "k", "family", "models"}], sorted by family then M, no duplicates.
    quick: every fourth shape."""
    shapes = []
    for i, f in enumerate(families()):
        ms = set(SWEEP_MS[i % STRIDE::STRIDE]) | set(EXTRA_MS.get((f["n"], f["k"]), ()))
        if max(ms) <= 2048:                       # every family reaches prefill (M > 2048)
            ms.add(SWEEP_MS[-1 - i % 4])
        shapes += [dict(f, m=m) for m in sorted(ms)]
    return shapes[::4] if quick else shapes


def band_of(m: int) -> str:
    for name, lo, hi in BANDS:
        if m >= lo and (hi is None or m <= hi):
            return name
    raise ValueError(f"M = {m} is in no band")


def short_label(shape: dict) -> str:
    return f"{shape['m']}x{shape['n']}x{shape['k']} {shape['family']}"


def suite_cases(quick: bool, make_dense) -> list:
    """Deferred builders (bench.suite_cases' form): a dense Problem per shape made by `make_dense`
    (bench.make_dense), suite "sweep", its family in the row."""

    def build(dev, s):
        problem = make_dense(s["m"], s["n"], s["k"], dev, suite="sweep")
        problem.label = short_label(s)
        problem.shape = dict(problem.shape, family=s["family"], band=band_of(s["m"]))
        return problem
    return [lambda dev, s=s: build(dev, s) for s in sweep_shapes(quick)]


# ---------------------------------------------------------------------------------------------
# Summary (pure: rows as bench.measure returns them).
# ---------------------------------------------------------------------------------------------
def _ok(row: dict, peer: str) -> Optional[dict]:
    entry = row["peers"].get(peer, {})
    return entry if entry.get("status") == "ok" and entry.get("us") else None


def _geomeans(rows: List[dict], peers) -> dict:
    out = {}
    for peer in peers:
        ok = [e for e in (_ok(r, peer) for r in rows) if e]
        out[peer] = {"rows": len(ok), "geomean_pct_floor": geomean(e["pct_floor"] for e in ok)}
    return out


def peer_wins(rows: List[dict], peers=("cublaslt", "triton")) -> dict:
    """peer -> shapes where that peer's correct result took less time than ours (a wrong or missing
    result of ours counts as a win of every correct peer), each {"label", "m", "n", "k", "ours_us",
    "peer_us", "ratio" (ours / peer time)}."""
    wins = {p: [] for p in peers}
    for r in rows:
        ours = _ok(r, "ours")
        for p in peers:
            other = _ok(r, p)
            if other and (ours is None or other["us"] < ours["us"]):
                wins[p].append({"label": r["label"], "m": r["m"], "n": r["n"], "k": r["k"],
                                "ours_us": ours["us"] if ours else None, "peer_us": other["us"],
                                "ratio": ours["us"] / other["us"] if ours else None})
    return wins


def worst(rows: List[dict], count: int = WORST) -> List[dict]:
    """The `count` shapes with our lowest % of floor (a wrong or failed result of ours first)."""
    def key(r):
        e = _ok(r, "ours")
        return e["pct_floor"] if e else -1.0
    out = []
    for r in sorted(rows, key=key)[:count]:
        e = r["peers"].get("ours", {})
        item = {"label": r["label"], "m": r["m"], "n": r["n"], "k": r["k"], "band": band_of(r["m"]),
                "status": e.get("status", "n/a"), "pct_floor": e.get("pct_floor"), "us": e.get("us"),
                "floor_us": r.get("floor_us")}
        if e.get("config") is not None:
            item["config"] = e["config"]
        out.append(item)
    return out


def sweep_summary(rows: List[dict]) -> dict:
    """summary["sweep"]: geomeans overall and per M band, peer wins, the worst ten."""
    rows = [r for r in rows if r.get("suite") == "sweep"]
    wins = peer_wins(rows)
    beaten = {r["label"] for found in wins.values() for r in found}
    return {
        "shapes": len(rows),
        "overall": _geomeans(rows, PEERS),
        "bands": {name: dict(_geomeans([r for r in rows if band_of(r["m"]) == name], PEERS),
                             shapes=sum(band_of(r["m"]) == name for r in rows))
                  for name, _, _ in BANDS},
        "ours_ge_all_peers": len(rows) - len(beaten),
        "peer_wins": {p: {"count": len(found), "shapes": found} for p, found in wins.items()},
        "worst": worst(rows),
    }


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.0f}%"


def print_sweep_summary(s: dict, out=None) -> None:
    out = out or sys.stdout
    print(f"sweep: {s['shapes']} shapes; geomean % of roofline floor (correct rows):", file=out)
    cols = [("all", s["overall"])] + [(name, s["bands"][name]) for name, _, _ in BANDS]
    print(f"  {'M band':<10}" + "".join(f"{PEER_TITLES[p]:>14}" for p in PEERS) + f"{'shapes':>8}", file=out)
    for name, g in cols:
        n = s["shapes"] if name == "all" else g["shapes"]
        print(f"  {name:<10}" + "".join(f"{_pct(g[p]['geomean_pct_floor']) + ' (' + str(g[p]['rows']) + ')':>14}"
                                        for p in PEERS) + f"{n:>8}", file=out)
    print(f"  ours >= every peer on {s['ours_ge_all_peers']} of {s['shapes']} shapes", file=out)
    for p, w in s["peer_wins"].items():
        print(f"  {PEER_TITLES[p]} faster than ours on {w['count']} shape(s)"
              + (":" if w["count"] else ""), file=out)
        for item in w["shapes"]:
            ratio = "ours wrong or failed" if item["ratio"] is None else f"ours {item['ratio']:.2f}x its time"
            print(f"    {item['label']}: {PEER_TITLES[p]} {item['peer_us']:.1f} µs, {ratio}", file=out)
    print(f"  worst {len(s['worst'])} of ours by % of floor:", file=out)
    for item in s["worst"]:
        cfg = f"  config {item['config']}" if "config" in item else ""
        us = "" if item["us"] is None else f", {item['us']:.1f} µs vs floor {item['floor_us']:.1f} µs"
        print(f"    {_pct(item['pct_floor']):>5}  {item['label']} [{item['band']}] {item['status']}{us}{cfg}",
              file=out)


# ---------------------------------------------------------------------------------------------
# Plot (optional: matplotlib): % of floor against M, one panel per family, ours vs each peer.
# ---------------------------------------------------------------------------------------------
def plot_sweep(rows: List[dict], path: str, title: str, cols: int = 6) -> Optional[str]:
    rows = [r for r in rows if r.get("suite") == "sweep"]
    if not rows:
        return "no sweep rows to plot"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    fams = list(dict.fromkeys((r["n"], r["k"]) for r in rows))
    nrows = math.ceil(len(fams) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.0 * cols, 2.6 * nrows), squeeze=False)
    styles = {"ours": ("C0", "-o"), "cublaslt": ("C1", "-s"), "triton": ("C2", "-^")}
    for i, (n, k) in enumerate(fams):
        ax = axes[i // cols][i % cols]
        sel = sorted((r for r in rows if (r["n"], r["k"]) == (n, k)), key=lambda r: r["m"])
        for peer, (color, style) in styles.items():
            pts = [(r["m"], e["pct_floor"]) for r in sel for e in [_ok(r, peer)] if e]
            if pts:
                ax.plot([m for m, _ in pts], [v for _, v in pts], style, color=color, markersize=3,
                        label=PEER_TITLES[peer])
        family = sel[0].get("family") or ""
        ax.set_title(f"{family[:44]}\nN={n}, K={k}", fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 105)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=6)
    for j in range(len(fams), nrows * cols):
        axes[j // cols][j % cols].axis("off")
    for row in axes:
        row[0].set_ylabel("% of floor", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("M", fontsize=7)
    axes[0][0].legend(fontsize=6)
    save_figure(fig, title, path, dpi=100)
    return None
