"""PNG charts of a benchmark result (``workerbus bench --plot DIR``), with matplotlib.

Three charts, each written only when the result has the runs it needs:

- ``deliveries.png``: flood deliveries/s of every scenario, one bar per subscriber count N,
  one panel per publisher count P;
- ``latency.png``: publish→handler latency p50 / p99 / max of every scenario at the fixed
  rate (log scale: the peers differ by orders of magnitude at the tail);
- ``seed.png``: the seed experiment's requests/s and HTTP p99 under each storm, per route.

matplotlib is the optional extra ``plot``; :func:`plot_support` says why it cannot be used.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["plot_support", "write_plots"]

#: Pixels per inch of the PNGs: readable on a docs page, a few tens of kB each.
DPI = 110


def plot_support() -> str | None:
    """None when plots can be drawn, else the reason (one line)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib (pip install 'workerbus[plot]')"
    return None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window, work without a display
    import matplotlib.pyplot as plt

    return plt


def _ok_medians(result: dict[str, Any], test: str) -> list[dict[str, Any]]:
    return [m for m in result["fanout"]["medians"] if m["test"] == test and m.get("runs_ok")]


def _scenarios(result: dict[str, Any], medians: list[dict[str, Any]]) -> list[str]:
    # In the result's order (workerbus first, then the peers), measured ones only.
    measured = {m["scenario"] for m in medians}
    return [s for s in result["scenarios"] if s in measured]


def _deliveries(result: dict[str, Any], path: str) -> bool:
    medians = _ok_medians(result, "thr")
    if not medians:
        return False
    plt = _pyplot()
    names = _scenarios(result, medians)
    pubs = sorted({m["n_pubs"] for m in medians})
    subs = sorted({m["n_subs"] for m in medians})
    by_key = {(m["scenario"], m["n_subs"], m["n_pubs"]): m["deliveries_per_s"] for m in medians}
    height = 0.8 / len(subs)
    fig, axes = plt.subplots(1, len(pubs), figsize=(5.2 * len(pubs) + 2.2, 0.5 * len(names) * len(subs) ** 0.5 + 1.6),
                             sharey=True, squeeze=False)  # fmt: skip
    for ax, p in zip(axes[0], pubs, strict=True):
        for j, n in enumerate(subs):
            ys = [i + (j - (len(subs) - 1) / 2) * height for i in range(len(names))]
            values = [by_key.get((s, n, p), 0.0) / 1000 for s in names]
            ax.barh(ys, values, height=height, label=f"N={n} subscribers")
        ax.set_title(f"P={p} publisher{'s' if p > 1 else ''}")
        ax.set_xlabel("thousand deliveries/s (more is better)")
        ax.grid(axis="x", alpha=0.3)
        ax.set_yticks(range(len(names)), names)
    axes[0][0].invert_yaxis()  # once: the panels share the y axis; first scenario on top
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(subs), fontsize="small")
    fig.suptitle("Fan-out throughput: deliveries/s of a flood, median of runs")
    fig.tight_layout(rect=(0, 0.04, 1, 1))  # room for the legend below the panels
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def _latency(result: dict[str, Any], path: str) -> bool:
    medians = [m for m in _ok_medians(result, "lat") if m.get("lat_p50_us") is not None]
    if not medians:
        return False
    plt = _pyplot()
    configs = sorted({(m["n_subs"], m["n_pubs"]) for m in medians})
    rate = result["settings"].get("rate", 0)
    fig, axes = plt.subplots(1, len(configs), squeeze=False,
                             figsize=(7.5 * len(configs), 0.45 * len(_scenarios(result, medians)) + 1.8))  # fmt: skip
    for ax, (n, p) in zip(axes[0], configs, strict=True):
        mine = {m["scenario"]: m for m in medians if (m["n_subs"], m["n_pubs"]) == (n, p)}
        names = [s for s in _scenarios(result, medians) if s in mine]
        for j, (key, label) in enumerate((("lat_p50_us", "p50"), ("lat_p99_us", "p99"), ("lat_max_us", "max"))):
            ys = [i + (j - 1) * 0.27 for i in range(len(names))]
            ax.barh(ys, [mine[s].get(key) or 0 for s in names], height=0.27, label=label)
        ax.set_xscale("log")
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_xlabel("µs, publish → handler (log scale, less is better)")
        ax.set_title(f"N={n} subscribers, P={p} publisher{'s' if p > 1 else ''}, {rate:,.0f} events/s")
        ax.grid(axis="x", alpha=0.3, which="both")
        ax.legend(loc="upper right", fontsize="small")
    fig.suptitle("Latency at a fixed rate")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def _seed(result: dict[str, Any], path: str) -> bool:
    seed = result.get("seed") or {}
    base = seed.get("baseline") or {}
    storms = seed.get("storms") or []
    if not storms:
        return False
    plt = _pyplot()
    routes: list[str] = []
    for storm in storms:
        routes += [r["mode"] for r in storm.get("rows", []) if r["mode"] not in routes]
    groups = [storm["name"] for storm in storms]
    values = {(storm["name"], r["mode"]): r for storm in storms for r in storm.get("rows", []) if r.get("ok")}
    fig, (ax_rps, ax_p99) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / len(routes)
    for j, route in enumerate(routes):
        xs = [i + (j - (len(routes) - 1) / 2) * width for i in range(len(groups))]
        rows = [values.get((g, route)) for g in groups]
        ax_rps.bar(xs, [r["requests_per_s"] if r else 0 for r in rows], width=width, label=route)
        ax_p99.bar(xs, [r["latency_p99_ms"] if r else 0 for r in rows], width=width, label=route)
    if base.get("ok"):
        ax_rps.axhline(base["requests_per_s"], color="black", linestyle="--", linewidth=1, label="no events")
        ax_p99.axhline(base["latency_p99_ms"], color="black", linestyle="--", linewidth=1, label="no events")
    labels = [storm.get("label", storm["name"]) for storm in storms]
    for ax, title in ((ax_rps, "requests/s (more is better)"), (ax_p99, "HTTP p99, ms (less is better)")):
        ax.set_xticks(range(len(groups)), labels, fontsize="small")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    ax_p99.legend(fontsize="small")
    settings = seed.get("settings", {})
    fig.suptitle(f"Seed experiment: uvicorn ({settings.get('workers', '?')} workers) under wrk "
                 "while every worker publishes an event storm")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def write_plots(result: dict[str, Any], directory: str) -> list[str]:
    """Write every chart the result has data for into ``directory``; return their paths."""
    os.makedirs(directory, exist_ok=True)
    written = []
    for name, draw in (("deliveries.png", _deliveries), ("latency.png", _latency), ("seed.png", _seed)):
        path = os.path.join(directory, name)
        if draw(result, path):
            written.append(path)
    return written
