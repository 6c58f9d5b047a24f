"""The cross-node targets of issue 11, from a benchmark result's medians.

For every ``cluster-<engine>-bridge*`` scenario measured, against ``cluster-<engine>-direct``
(the same processes using the engine directly): flood deliveries/s to N=4 workers at least
0.8× the direct ones, and the p99 at the fixed rate (5 000 events/s) at most 1 ms above the
direct p99.
"""

from __future__ import annotations

from typing import Any

__all__ = ["cluster_targets"]

#: bridge deliveries/s over direct deliveries/s, at least
MIN_RATIO = 0.8
#: bridge p99 minus direct p99, at most (µs)
MAX_P99_ADDED_US = 1000.0


def cluster_targets(medians: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ok = {(m["scenario"], m["test"], m["n_subs"], m["n_pubs"]): m for m in medians if m.get("runs_ok")}

    def get(scenario: str, test: str, metric: str) -> float | None:
        m = ok.get((scenario, test, 4, 1))
        v = None if m is None else m.get(metric)
        return float(v) if isinstance(v, (int, float)) else None

    out: list[dict[str, Any]] = []
    bridges = sorted({m["scenario"] for m in medians if m["scenario"].startswith("cluster-") and "-bridge" in m["scenario"]})
    for s in bridges:
        direct = s.split("-bridge")[0] + "-direct"
        thr, base = get(s, "thr", "deliveries_per_s"), get(direct, "thr", "deliveries_per_s")
        ratio = None if thr is None or not base else thr / base
        p99, base99 = get(s, "lat", "lat_p99_us"), get(direct, "lat", "lat_p99_us")
        added = None if p99 is None or base99 is None else p99 - base99
        for target, value, limit, at_most, unit in (
            (f"deliveries/s N=4 P=1 vs {direct}", ratio, MIN_RATIO, False, "×"),
            (f"p99 added to {direct}, 5k ev/s, N=4", added, MAX_P99_ADDED_US, True, "µs"),
        ):
            met = None if value is None else (value <= limit if at_most else value >= limit)
            out.append({"scenario": s, "target": target, "value": value, "limit": limit,
                        "at_most": at_most, "unit": unit, "met": met})  # fmt: skip
    return out
