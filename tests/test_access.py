"""Access control: socket mode and group, peer credentials, planted symlinks, other brokers.

- the socket is created 0600 by default; mode and group are options;
- the broker checks each peer's uid (``SO_PEERCRED``) and refuses untrusted ones, with a
  logged reason (default: its own uid and root; ``--allow-uid`` adds more);
- it never follows or replaces a symlink (or any non-socket) planted at its path;
- it never takes over, or unlinks, a socket another live broker is serving.
"""

from __future__ import annotations

import grp
import logging
import os
import socket
import stat
import subprocess
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from shared.broker import Broker
from shared.errors import AddressInUse
from shared.frame import encode_frame
from shared.listener import open_unix_listener
from shared.messages import encode_hello
from shared.peercred import PEERCRED_SUPPORTED, default_trusted_uids
from shared.profile import NATIVE
from tests.faultkit import PY, REPO, BrokerProc, reap
from tests.helpers import wait_until

NOBODY = 65534


@asynccontextmanager
async def serving(address: str, **options: Any) -> AsyncIterator[Broker]:
    serve_options = {k: options.pop(k) for k in ("mode", "group") if k in options}
    broker = Broker(**options)
    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: broker.serve(address, task_status=task_status, **serve_options))
        yield broker
        tg.cancel_scope.cancel()


def _path(address: str) -> str:
    return address[len("unix:") :]


async def _refusal(path: str) -> bytes:
    """What the broker says before it closes a connection it refuses (b"" if nothing)."""
    answer = b""
    with anyio.fail_after(10):
        stream = await anyio.connect_unix(path)
        async with stream:
            try:
                while True:
                    answer += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return answer


# --- mode and group ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_socket_is_0600_by_default(address: str) -> None:
    async with serving(address, transport="http"):
        assert stat.S_IMODE(os.stat(_path(address)).st_mode) == 0o600
    assert _gone(_path(address))


def _gone(path: str) -> bool:
    return not os.path.lexists(path)


def _other_group() -> grp.struct_group:
    if os.geteuid() == 0:
        for g in grp.getgrall():
            if g.gr_gid != os.getgid():
                return g
    return grp.getgrgid(os.getgid())  # without root, only a group we are in


@pytest.mark.anyio
@pytest.mark.parametrize("by", ["name", "gid"])
async def test_mode_and_group_are_options(address: str, by: str) -> None:
    group = _other_group()
    async with serving(address, transport="http", mode=0o660, group=group.gr_name if by == "name" else group.gr_gid):
        st = os.stat(_path(address))
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == group.gr_gid


@pytest.mark.anyio
async def test_unknown_group_is_refused_before_anything_is_created(address: str) -> None:
    with pytest.raises(ValueError, match="unknown group"):
        await open_unix_listener(_path(address), group="no-such-group-workerbus")
    assert os.listdir(os.path.dirname(_path(address))) == []


# --- peer credentials --------------------------------------------------------------------


def test_default_trust_is_own_uid_and_root() -> None:
    assert default_trusted_uids() == {os.geteuid(), 0}
    assert default_trusted_uids([NOBODY]) == {os.geteuid(), 0, NOBODY}


@pytest.mark.anyio
@pytest.mark.skipif(not PEERCRED_SUPPORTED, reason="SO_PEERCRED is Linux-only")
@pytest.mark.parametrize("transport", ["stream", "http"])
async def test_untrusted_uid_is_refused_with_a_reason(
    address: str, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "shared.broker")
    stranger = os.geteuid() + 12345  # trust someone else only: we are the stranger now
    async with serving(address, transport=transport, allowed_uids={stranger}) as broker:
        answer = await _refusal(_path(address))
        if transport == "http":  # an HTTP client is told why; the stream transport cannot
            assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n"), answer
            assert answer.endswith(f"\r\n\r\nuid {os.geteuid()} is not trusted by this broker\n".encode())
        else:
            assert answer == b""
        stats = broker.statistics()
        assert (stats.refused_untrusted, stats.refused, stats.accepted) == (1, 1, 0)
    assert f"uid {os.geteuid()} is not trusted (trusted uids: {stranger}" in caplog.text
    assert f"pid {os.getpid()}" in caplog.text


def _connect_as(uid: int, path: str) -> str:
    """From a forked child running as ``uid``: "refused" or "served" (stream transport).

    A fork, not an exec: the interpreter under /root is not executable for other users.
    """
    hello = encode_frame(encode_hello(NATIVE, 9, os.getpid()))
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # 3.12+ warns about fork() with threads alive; the child only makes one syscall
        # sequence and _exit()s, it takes no lock another thread could hold.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        verdict = b"error"
        try:
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(1.0)
            s.connect(path)
            try:
                s.sendall(hello)
                verdict = b"refused" if s.recv(1) == b"" else b"served"
            except (BrokenPipeError, ConnectionResetError):
                verdict = b"refused"  # closed before (or while) we sent the hello
            except TimeoutError:
                verdict = b"served"  # still connected: the broker kept us
        except OSError as exc:
            verdict = f"error: {exc!r}".encode()
        finally:
            os.write(write_end, verdict)
            os._exit(0)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as r:
            return r.read().decode()
    finally:
        os.waitpid(pid, 0)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not PEERCRED_SUPPORTED, reason="needs root to run a peer as another uid")
def test_another_users_process_is_refused_unless_allowed(sock_dir: str) -> None:
    os.chmod(sock_dir, 0o755)  # let the other user reach the socket file itself
    path = os.path.join(sock_dir, "bus.sock")
    with reap() as procs:
        broker = BrokerProc(path, "--transport", "stream", "--mode", "666")
        procs.append(broker)
        # The file mode lets uid 65534 connect; the credential check does not.
        assert _connect_as(NOBODY, path) == "refused"
        assert broker.stats()["refused_untrusted"] == 1
        assert f"uid {NOBODY} is not trusted" in broker.log()
        assert _connect_as(0, path) == "served"
        broker.stop()

        allowing = BrokerProc(path, "--transport", "stream", "--mode", "666", "--allow-uid", str(NOBODY))
        procs.append(allowing)
        assert _connect_as(NOBODY, path) == "served"
        assert allowing.stats()["accepted"] == 1


# --- what is already at the path ---------------------------------------------------------


@pytest.mark.parametrize("target", ["missing", "file", "live-socket"])
def test_a_planted_symlink_is_never_followed_or_replaced(sock_dir: str, target: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    aim = os.path.join(sock_dir, "target")
    live: socket.socket | None = None
    if target == "file":
        with open(aim, "w") as f:
            f.write("precious")
    elif target == "live-socket":
        live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        live.bind(aim)
        live.listen()
    os.symlink(aim, path)
    try:
        with pytest.raises(OSError, match="is a symlink; not replacing it"):
            anyio.run(open_unix_listener, path)
        assert os.readlink(path) == aim  # the link is still there, untouched
        if target == "file":
            with open(aim) as f:
                assert f.read() == "precious"
        elif target == "live-socket":
            assert stat.S_ISSOCK(os.lstat(aim).st_mode)
        else:
            assert not os.path.lexists(aim)  # nothing was created through the link
        assert sorted(os.listdir(sock_dir)) == sorted({"bus.sock", *([] if target == "missing" else ["target"])})
    finally:
        if live is not None:
            live.close()


def test_a_regular_file_is_never_replaced(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    with open(path, "w") as f:
        f.write("not a socket")
    with pytest.raises(OSError, match="is not a socket; not replacing it"):
        anyio.run(open_unix_listener, path)
    with open(path) as f:
        assert f.read() == "not a socket"


@pytest.mark.anyio
async def test_a_stale_socket_is_replaced(address: str) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(_path(address))
    dead.close()  # the file stays, nobody listens: a crashed broker's leftover
    async with serving(address, transport="http") as broker:
        assert not await _refused_quickly(_path(address))
        await _until_seen(broker, refused=1)


async def _until_seen(broker: Broker, *, refused: int) -> None:
    # The connection made to the broker was served: counted as refused (it said no hello).
    await wait_until(lambda: broker.statistics().refused >= refused, 10)


@pytest.mark.anyio
async def test_a_broker_stopped_as_a_connection_arrives_logs_no_error(
    address: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A broker cancelled in the loop turn in which its listener became readable. Through
    # anyio's own UNIX accept, asyncio then logged "Exception in callback ...
    # InvalidStateError" (an ERROR at every such shutdown, and a failed test wherever a
    # worker reconnects while a broker stops: the embedded takeover, the channels layer).
    for _ in range(10):
        caplog.clear()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
            async with serving(address, transport="stream"):
                await anyio.wait_all_tasks_blocked()  # the broker waits in its accept
                peer.connect(_path(address))  # in the backlog: readable at the next poll
                await anyio.lowlevel.checkpoint()  # the cancel below runs in the turn that polls it
            for _ in range(3):
                await anyio.lowlevel.checkpoint()  # (the callback that failed ran right after)
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def _refused_quickly(path: str) -> bool:
    try:
        stream = await anyio.connect_unix(path)
    except OSError:
        return True
    await stream.aclose()
    return False


@pytest.mark.anyio
async def test_a_live_brokers_socket_is_never_taken_over(address: str) -> None:
    async with serving(address, transport="http") as first:
        inode = os.stat(_path(address)).st_ino
        with pytest.raises(AddressInUse, match="already listening"):
            await Broker(transport="http").serve(address)
        assert os.stat(_path(address)).st_ino == inode
        # The second broker's liveness probe connected and left at once: counted, no harm.
        await _until_seen(first, refused=1)
        assert first.statistics().accepted == 0


@pytest.mark.anyio
async def test_shutdown_removes_only_its_own_socket_file(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    other = os.path.join(sock_dir, "other.sock")
    async with serving(f"unix:{other}", transport="http") as theirs_broker:
        async with serving(f"unix:{path}", transport="http"):
            # Someone moves another broker's socket over ours while we run.
            os.rename(other, path)
            theirs = os.stat(path).st_ino
        # We stopped: the file at our path is theirs, so it is still there and still live.
        assert os.stat(path).st_ino == theirs
        assert not await _refused_quickly(path)
        await _until_seen(theirs_broker, refused=1)


@pytest.mark.slow
def test_second_broker_on_a_path_exits_with_a_clear_message(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    with reap() as procs:
        first = BrokerProc(path)
        procs.append(first)
        inode = os.stat(path).st_ino
        second = subprocess.run(
            [PY, "-m", "shared.tools.cli", "broker", "--listen", f"unix:{path}"],
            cwd=REPO, capture_output=True, text=True, timeout=30,
        )
        assert second.returncode == 1
        assert second.stderr.strip().endswith(f"a broker is already listening on unix:{path}")
        assert "Traceback" not in second.stderr
        # The first one is untouched and still serving.
        assert os.stat(path).st_ino == inode and first.alive()
        done = subprocess.run(
            [PY, "-m", "shared.tools.cli", "publish", f"unix:{path}", "s", "e"], cwd=REPO, capture_output=True, timeout=30
        )
        assert done.returncode == 0
        assert first.stats()["router"]["publishes"] == 1
        assert first.stop() == 0
        assert not os.path.exists(path)


@pytest.mark.slow
def test_planted_symlink_makes_the_cli_exit_with_a_clear_message(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    os.symlink("/etc/passwd", path)
    done = subprocess.run(
        [PY, "-m", "shared.tools.cli", "broker", "--listen", f"unix:{path}"], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1
    assert "is a symlink; not replacing it" in done.stderr and "Traceback" not in done.stderr
    assert os.readlink(path) == "/etc/passwd"
