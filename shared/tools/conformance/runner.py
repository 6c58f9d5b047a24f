"""Selecting cases, running them one by one, reporting lines and the JSON report."""

from __future__ import annotations

import datetime
import fnmatch
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TextIO

from shared.tools.conformance import (
    cases_bad,
    cases_cluster,
    cases_filter,
    cases_frames,
    cases_handshake,
    cases_native,
    cases_routing,
    cases_unframed,
)
from shared.tools.conformance.casekit import REGISTRY, Case, CaseFailed, CaseSkipped, Ctx, KitConfig
from shared.tools.conformance.wire import SendFailed
from shared.tools.progress import Progress

__all__ = ["CaseResult", "Report", "run_suite", "select", "write_json"]

#: Imported for their @case registrations; this is the run order: connection start first,
#: then framing, routing, and the bad-input cases last.
CASE_MODULES = (
    cases_handshake, cases_frames, cases_routing, cases_native, cases_cluster, cases_filter, cases_unframed, cases_bad
)


def all_cases() -> list[Case]:
    """Every case in run order; a case's index here fixes its worker ids."""
    rank = {m.__name__: i for i, m in enumerate(CASE_MODULES)}
    return sorted(REGISTRY, key=lambda c: rank[c.func.__module__])  # stable: keeps def order


@dataclass
class CaseResult:
    name: str
    status: str  # "pass" | "fail" | "skip"
    reason: str | None
    duration: float
    summary: str


@dataclass
class Report:
    target: str
    transport: str
    profile: str
    options: dict[str, object]
    started: str
    cases: list[CaseResult] = field(default_factory=list)
    duration: float = 0.0

    def count(self, status: str) -> int:
        return sum(1 for c in self.cases if c.status == status)

    @property
    def totals(self) -> dict[str, int]:
        return {"passed": self.count("pass"), "failed": self.count("fail"),
                "skipped": self.count("skip")}

    def totals_line(self) -> str:
        t = self.totals
        line = f"{t['passed']} passed, {t['failed']} failed"
        return line + (f", {t['skipped']} skipped" if t["skipped"] else "")

    def to_json(self) -> dict[str, object]:
        return {
            "target": self.target,
            "transport": self.transport,
            "profile": self.profile,
            "options": self.options,
            "started": self.started,
            "duration": round(self.duration, 3),
            "cases": [asdict(c) for c in self.cases],
            "totals": self.totals,
        }


def _matches(name: str, pattern: str) -> bool:
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def select(patterns: Sequence[str] | None) -> list[tuple[int, Case]]:
    """(registry index, case) of every case matching any pattern (all when none given).

    The registry index, not the position in the selection, fixes a case's worker ids, so a
    case talks to the broker identically whether run alone or in the full suite.
    """
    return [
        (i, c) for i, c in enumerate(all_cases())
        if not patterns or any(_matches(c.name, p) for p in patterns)
    ]


def _skip_reason(cfg: KitConfig, c: Case) -> str | None:
    if c.http_only and cfg.transport != "http":
        return "HTTP handshake case; the stream transport has no handshake"
    if c.native_only and not cfg.profile.native:
        return f"native profile only: {c.native_only}"
    return None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _run_case(cfg: KitConfig, index: int, c: Case) -> CaseResult:
    start = time.monotonic()
    status, reason = "pass", None
    skip = _skip_reason(cfg, c)
    if skip is not None:
        return CaseResult(c.name, "skip", skip, 0.0, c.summary)
    ctx = Ctx(cfg, c.name, index)
    try:
        c.func(ctx)
    except CaseFailed as exc:
        status, reason = "fail", str(exc)
    except CaseSkipped as exc:
        status, reason = "skip", str(exc)
    except SendFailed as exc:
        status, reason = "fail", str(exc)
    except Exception as exc:  # noqa: BLE001 - any error in a case is that case's FAIL
        status, reason = "fail", f"{type(exc).__name__}: {exc}"
    finally:
        ctx.close_all()
    return CaseResult(c.name, status, reason and _one_line(reason),
                      round(time.monotonic() - start, 4),
                      c.summary)


def run_suite(cfg: KitConfig, patterns: Sequence[str] | None, out: TextIO,
              progress_stream: TextIO | None = None) -> Report:  # fmt: skip
    """Run the selected cases in registry order, printing one line per case and the totals.

    On a terminal ``progress_stream`` (stderr by default) also shows which case runs and
    the time left, on one line redrawn in place; piped, it shows nothing.
    """
    report = Report(
        target=cfg.address,
        transport=cfg.transport,
        profile=cfg.profile.name,
        options={
            "case_timeout": cfg.case_timeout,
            "handshake_deadline": cfg.handshake_deadline,
            "unique_timeout": cfg.unique_timeout,
            "workers": cfg.workers,
            "max_payload": cfg.max_payload,
            "id_base": cfg.id_base,
            "only": list(patterns or []),
            "nonce": cfg.nonce,
        },
        started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    print(f"conformance: broker {cfg.address} transport={cfg.transport} "
          f"profile={cfg.profile.name}", file=out, flush=True)
    start = time.monotonic()
    selected = select(patterns)
    with Progress(len(selected), stream=progress_stream) as progress:
        for index, c in selected:
            progress.start(f"case {c.name}")
            result = _run_case(cfg, index, c)
            report.cases.append(result)
            line = f"{result.status.upper()} {result.name} ({result.duration:.2f}s)"
            if result.reason:
                line += f": {result.reason}"
            progress.done()
            progress.print(line, file=out)
    report.duration = time.monotonic() - start
    print(report.totals_line(), file=out, flush=True)
    return report


def write_json(data: dict[str, object], path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
