"""The cluster scope (docs/cluster.md), negotiated like the other native extensions
(docs/protocol.md §8): a broker accepts ``"scope": "cluster"`` in a publish spec only from a
client whose hello asked for the ``cluster`` capability and whose welcome granted it.

Black box: a broker without a bridge is a one-node cluster, so what a granted client
publishes with the scope reaches this broker's own workers like any publish. A broker that
does not offer the scope at all (no ``cluster`` in its welcome) skips the first case; every
broker that serves the native extensions must refuse the scope from a client that did not
ask for it.
"""

from __future__ import annotations

from shared.tools.conformance.casekit import CaseFailed, CaseSkipped, Ctx, case
from shared.tools.conformance.cases_native import _require_extensions, _worker_with_caps

NATIVE_ONLY = "the kong profile has no cluster scope (lua-resty-events has none)"


@case("cluster.granted", "a client granted 'cluster' publishes with scope cluster (all, "
      "others): delivered here as any publish", native_only=NATIVE_ONLY)
def granted(ctx: Ctx) -> None:
    _require_extensions(ctx)
    sub_id, pub_id = ctx.id0, ctx.id0 + 1
    (sub,) = ctx.join([sub_id])
    pub, welcome = _worker_with_caps(ctx, pub_id, ["welcome", "cluster"])
    caps = welcome.get("caps") or []
    if "cluster" not in caps:
        raise CaseSkipped(f"the broker does not offer the cluster scope (its welcome grants {caps!r})")
    to_all = ctx.event(pub_id, "cluster-all")
    to_others = ctx.event(pub_id, "cluster-others")
    ctx.publish(pub, {"scope": "cluster"}, to_all)
    ctx.publish(pub, {"others": True, "scope": "cluster"}, to_others)
    ctx.expect(sub, [to_all, to_others], f"worker {sub_id}")
    # The publisher gets its "all" event, not its "others" one, and is still served.
    ctx.expect(pub, [to_all], f"worker {pub_id} (the publisher)")
    ctx.roundtrip(pub, pub_id, f"worker {pub_id} after its cluster publishes")


@case("cluster.not-asked", "a publish with scope cluster from a client that did not ask for "
      "'cluster' closes that connection; what it sent before is delivered, the scoped event "
      "is not", native_only=NATIVE_ONLY)
def not_asked(ctx: Ctx) -> None:
    _require_extensions(ctx)
    sub_id = ctx.id0 + 1
    (sub,) = ctx.join([sub_id])
    for wid, caps in ((ctx.id0, None), (ctx.id0 + 2, ["welcome", "barrier"])):
        who = f"worker {wid} ({'plain hello' if caps is None else f'caps {caps}'})"
        if caps is None:
            offender = ctx.worker(wid)
        else:
            offender, welcome = _worker_with_caps(ctx, wid, caps)
            if "cluster" in (welcome.get("caps") or []):
                raise CaseFailed(f"{who}: the welcome grants 'cluster', which was not asked for")
        before = ctx.event(wid, "before-the-scope")
        scoped = ctx.event(wid, "scope-not-granted")
        sent = ctx.publish_frame({}, before) + ctx.publish_frame({"scope": "cluster"}, scoped)
        offender.send(sent)
        ctx.expect_closed(offender, who, sent)
        # Exactly the publish before it (expect fails on the scoped event arriving too).
        ctx.expect(sub, [before], f"worker {sub_id}, after {who}")
    ctx.check_bystander(sub, sub_id)
