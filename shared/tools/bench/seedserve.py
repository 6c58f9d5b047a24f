"""One web-server process of the seed experiment: uvicorn serving :mod:`.seedapp`.

Every process opens its own listening socket on the same 127.0.0.1 port with
``SO_REUSEPORT``, so the kernel spreads new connections over the processes. (With
``uvicorn --workers N`` all workers share one socket, and the first to wake accepts every
pending connection: with wrk's connections all opened at once, one worker often got all of
them and the other idled, which made runs differ by 40 %.)

usage: python -m shared.tools.bench.seedserve PORT
"""

from __future__ import annotations

import socket
import sys


def main(argv: list[str]) -> None:
    import uvicorn

    port = int(argv[0])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(2048)
    config = uvicorn.Config(
        "shared.tools.bench.seedapp:app", log_level="warning", access_log=False, lifespan="on"
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main(sys.argv[1:])
