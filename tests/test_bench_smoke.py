"""``workerbus bench`` in its tiniest configuration: the runner works end to end.

No timing is asserted (speed lives in docs/benchmarks.md); these check that the command
runs the way a user runs it, counts every delivery, and writes a report of the documented
shape.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

SCENARIO = "workerbus-stream-asyncio"


def _bench(tmp_path: Path, *args: str, timeout: float = 120) -> dict[str, Any]:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "shared.tools.cli", "bench", *args, "--json", str(out),
         "--markdown", str(tmp_path / "bench.md"), "--wait-idle", "0", "--retries", "0"],
        capture_output=True, text=True, timeout=timeout, check=False,
        start_new_session=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "bench.md").read_text().startswith("- machine:")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def test_tiny_fanout_run_counts_every_delivery(tmp_path: Path) -> None:
    n_subs, n_pubs, events = 2, 2, 3000
    result = _bench(
        tmp_path,
        "--peers", SCENARIO, "--tests", "lat,thr",
        "--subs", str(n_subs), "--pubs", str(n_pubs), "--lat-subs", str(n_subs), "--lat-pubs", "1",
        "--events", str(events), "--rate", "2000", "--duration", "0.5", "--reps", "1", "--no-seed",
    )  # fmt: skip
    assert set(result) >= {"meta", "command", "settings", "wall_s", "scenarios", "fanout", "seed"}
    assert result["meta"]["nproc"] == os.cpu_count()
    assert {"cpu_model", "python", "packages", "date"} <= set(result["meta"])
    assert result["scenarios"][SCENARIO]["unavailable"] is None
    assert result["seed"] is None
    medians = {m["test"]: m for m in result["fanout"]["medians"]}
    assert set(medians) == {"thr", "lat"}

    thr = medians["thr"]
    assert (thr["scenario"], thr["n_subs"], thr["n_pubs"], thr["runs_ok"]) == (SCENARIO, n_subs, n_pubs, 1)
    assert thr["expected"] == n_subs * events
    assert thr["delivered"] == thr["expected"]
    assert thr["lost"] == 0
    for key in ("deliveries_per_s", "broker_cpu_s_per_M", "total_cpu_s_per_M", "broker_peak_rss_mib",
                "sub_cpu_s_per_M", "pub_cpu_s_per_M", "background_cpu_pct"):  # fmt: skip
        assert isinstance(thr[key], (int, float)) and thr[key] >= 0, key

    lat = medians["lat"]
    assert lat["events"] == 1000  # 2000 events/s for 0.5 s
    assert lat["delivered"] == lat["expected"] == n_subs * 1000
    assert lat["lat_samples"] == lat["delivered"]
    assert 0 < lat["lat_p50_us"] <= lat["lat_p99_us"] <= lat["lat_max_us"]

    runs = result["fanout"]["runs"]
    assert len(runs) == 2 and all(r["ok"] and r["used"] for r in runs)
    targets = {t["target"] for t in _targets(result)}
    assert "p99 publish→handler, 10k ev/s, N=4" in targets


def _targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    from shared.tools.bench.report import evaluate_targets

    return evaluate_targets(result)


def test_list_names_every_scenario() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "shared.tools.cli", "bench", "--list"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    assert SCENARIO in names and "limit-raw-uds" in names and "shm-poll-10ms" in names


def test_quick_subset_run_counts_handled_events(tmp_path: Path) -> None:
    # The shape (16 workers each on 1 of 8 sources, 4 publishers), short, on both
    # buses: every worker handles exactly its source's events, the publish-only client
    # none; workerbus sends each worker only those, limit-raw-uds every event to every
    # worker (and its workers decode them all).
    result = _bench(tmp_path, "--peers", "subset", "--quick", "--events", "3200")
    assert result["fanout"]["medians"] == [] and result["seed"] is None
    subset = result["subset"]
    assert (subset["subs"], subset["pubs"], subset["sources"], subset["events"], subset["reps"]) == (16, 4, 8, 3200, 1)
    handled = 16 * 3200 // 8 + 3200  # the workers, and the client on everything
    wb = subset["workerbus"]
    assert wb["ok"], wb
    assert wb["handled"] == handled
    assert wb["broker_dropped"] == 0
    # every event reaches the everything client, 2 of the 16 workers, not the publish-only one
    assert wb["broker_filtered"] >= 3200 * (16 - 2 + 1)
    raw = subset["limit-raw-uds"]
    assert raw["ok"], raw
    assert raw["handled"] == handled
    assert raw["deliveries"] == (16 + 1) * 3200  # the publish-only process has no subscriber connection
    assert [r["route"] for r in subset["runs"]] == ["workerbus", "limit-raw-uds"]
    for r in (wb, raw):
        for key in ("cpu_s_per_million_handled", "broker_cpu_s", "subscribers_cpu_s", "publishers_cpu_s",
                    "publish_only_client_cpu_s", "everything_client_cpu_s", "background_cpu_pct"):  # fmt: skip
            assert isinstance(r[key], (int, float)) and r[key] >= 0, key
    assert subset["cpu_vs_raw"] == round(wb["cpu_s_per_million_handled"] / raw["cpu_s_per_million_handled"], 3)
    assert subset["publish_only_vs_subscribed"] >= 0
    rows = [t for t in _targets(result) if t["scenario"].startswith("subset")]
    assert [(t["limit"], t["issue"]) for t in rows] == [(0.5, 14), (0.05, 14)]
    assert "### Subset" in (tmp_path / "bench.md").read_text()


def test_list_names_the_subset_scenario() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "shared.tools.cli", "bench", "--list"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert any(line.split()[:1] == ["subset"] for line in proc.stdout.splitlines())


@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs Debian's wrk")
def test_tiny_seed_experiment(tmp_path: Path) -> None:
    result = _bench(
        tmp_path, "--seed-only", "--seed-duration", "1", "--seed-reps", "1",
        "--seed-storms", "tiny=20/0.1", "--seed-workers", "2", timeout=180,
    )  # fmt: skip
    seed = result["seed"]
    assert result["fanout"]["medians"] == []
    assert seed["baseline"]["ok"], seed["baseline"]
    assert seed["baseline"]["requests_per_s"] > 0
    (storm,) = seed["storms"]
    rows = {r["mode"]: r for r in storm["rows"]}
    assert set(rows) == {"workerbus", "workerbus-embedded", "shm-poll"}
    for mode, row in rows.items():
        assert row["ok"], (mode, row)
        assert row["requests_per_s"] > 0
        # 2 workers × 20 events per 0.1 s, every worker handles every event
        assert row["published_per_s"] > 0
        assert row["received_per_s"] > 0


CLUSTER = ("cluster-nats-direct", "cluster-nats-bridge", "cluster-redis-direct", "cluster-redis-bridge")


@pytest.mark.skipif(
    shutil.which("nats-server") is None or shutil.which("redis-server") is None,
    reason="needs Debian's nats-server and redis-server",
)
def test_tiny_cluster_run_counts_every_delivery(tmp_path: Path) -> None:
    # Two nodes bridged through each engine, and the engine alone, in one run: every
    # event reaches every subscriber on the other node, the fixed-rate test runs at the
    # cluster rate (5 000/s) whatever --rate says, and the targets name both sides.
    n_subs, events = 4, 2000
    result = _bench(
        tmp_path,
        "--peers", ",".join(CLUSTER), "--tests", "lat,thr", "--subs", str(n_subs), "--pubs", "1",
        "--lat-subs", str(n_subs), "--lat-pubs", "1", "--events", str(events), "--rate", "2000",
        "--duration", "0.4", "--reps", "1", "--no-seed", timeout=240,
    )  # fmt: skip
    for name in CLUSTER:
        assert result["scenarios"][name]["unavailable"] is None, name
    medians = {(m["scenario"], m["test"]): m for m in result["fanout"]["medians"]}
    assert set(medians) == {(s, t) for s in CLUSTER for t in ("thr", "lat")}
    for name in CLUSTER:
        thr, lat = medians[(name, "thr")], medians[(name, "lat")]
        assert thr["runs_ok"] == 1 and lat["runs_ok"] == 1, (thr.get("error"), lat.get("error"))
        assert thr["delivered"] == thr["expected"] == n_subs * events, name
        assert lat["events"] == 2000  # 5 000 events/s for 0.4 s
        assert lat["delivered"] == lat["expected"] == n_subs * 2000, name
        assert lat["lat_samples"] == lat["delivered"]
        assert 0 < lat["lat_p50_us"] <= lat["lat_p99_us"]
    # the bridge scenarios run an engine and two brokers: three processes measured
    bridge_runs = [r for r in result["fanout"]["runs"] if r["scenario"].endswith("-bridge")]
    assert all(r["ok"] and r["broker_cpu_s"] >= 0 for r in bridge_runs)
    targets = [t for t in _targets(result) if t["scenario"].startswith("cluster-")]
    assert {(t["scenario"], t["unit"]) for t in targets} == {
        (f"cluster-{e}-bridge", u) for e in ("nats", "redis") for u in ("×", "µs")
    }
    assert all(isinstance(t["value"], float) for t in targets)


def test_list_names_the_cluster_scenarios() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "shared.tools.cli", "bench", "--list"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    assert set(CLUSTER) | {"cluster-nats-bridge-trio"} <= set(names)
