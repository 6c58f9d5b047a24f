"""The pyzmq peer's broker: ``zmq.proxy(XSUB, XPUB)`` on two ipc:// endpoints.

The proxy loop runs inside libzmq (C); this process only hosts it. High-water marks are 0
(unlimited) so a flood is buffered, never dropped.

usage: python -m shared.tools.bench.peers.zmqproxy_broker IN_ENDPOINT OUT_ENDPOINT
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import zmq


def _exit(*_: Any) -> None:
    raise SystemExit(0)


def main(inbound: str, outbound: str) -> None:
    ctx = zmq.Context()
    xsub = ctx.socket(zmq.XSUB)
    xsub.setsockopt(zmq.RCVHWM, 0)
    xsub.bind(inbound)
    xpub = ctx.socket(zmq.XPUB)
    xpub.setsockopt(zmq.SNDHWM, 0)
    xpub.bind(outbound)
    signal.signal(signal.SIGTERM, _exit)
    try:
        zmq.proxy(xsub, xpub)
    except (zmq.ContextTerminated, SystemExit, KeyboardInterrupt):
        pass
    finally:
        xsub.close(0)
        xpub.close(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
