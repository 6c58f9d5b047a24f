"""The ``wid`` of an event from another node of a cluster.

A module of its own, never compiled: an ``int`` subclass cannot be a mypyc native class,
and :mod:`shared.messages` (which may be compiled, docs/compiled.md) makes these.
"""

from __future__ import annotations

__all__ = ["NodeWid"]


class NodeWid(int):
    """The ``wid`` of an event that came from another node of a cluster (docs/cluster.md).

    It is the publisher's worker id *on its own node* (ids are per node), and says which
    node that was: ``wid.node``. Handlers keep lua-resty-events' shape
    ``(data, event, source, wid)``; ``getattr(wid, "node", None)`` is None for events of
    this host.
    """

    node: str

    def __new__(cls, wid: int, node: str) -> NodeWid:
        self = super().__new__(cls, wid)
        self.node = node
        return self

    def __repr__(self) -> str:
        return f"{int(self)}@{self.node}"
