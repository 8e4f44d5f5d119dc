"""Start `opd sampler` / `opd grader` as child processes on free loopback ports.

The learner's embedded default uses this when a config names no service URLs, and the tests use
it to drive real servers over HTTP. A child is polled on /health until ready; if it dies first,
the error names it and shows the tail of its log. While running, a watchdog restarts a child that
died (on the same port, a few times at most), so a crashed server costs a restart, not the run.
Each child leads its own process group (vLLM starts engine processes under it); on exit that group
alone is signalled (SIGTERM, then SIGKILL after a grace period).
"""

import contextlib
import ctypes
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

from opd.errors import ServiceError

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 300.0
"""Loading a 1.5B teacher from a cold disk can take minutes; tiny models take ~5 s."""
STOP_GRACE_S = 10.0
MAX_RESTARTS = 5
"""A child that dies more often than this is left dead: it is crash-looping, not unlucky."""
WATCHDOG_INTERVAL_S = 0.5
EXIT_PORT_IN_USE = 98
"""Exit status of a server whose port is taken (errno EADDRINUSE on Linux); the launcher retries."""
PORT_ATTEMPTS = 4
"""A free port can be taken between our probe and the child's bind: vLLM engines starting next to
it pick their own ports the same way. Each retry probes a new port."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bind_listener(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before the model loads so the port is claimed early.
    `host` is an IP address or a name bound at its first address (`localhost` may be ::1); "0.0.0.0"
    is every IPv4 interface. A taken port ends the process with EXIT_PORT_IN_USE and one line."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    try:
        listener = socket.create_server((host, port), family=family)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        print(f"opd: port {port} on {host} is already in use; pick another with --port", file=sys.stderr)
        raise SystemExit(EXIT_PORT_IN_USE) from None
    # asyncio turns Nagle off (TCP_NODELAY) only on connections whose socket says IPPROTO_TCP, and
    # create_server leaves proto 0. With Nagle on, uvicorn's h11 protocol (used where httptools is
    # not installed) sends a small reply's body only after the client's delayed ACK of its headers:
    # 43 ms on every small request (the embedded default's generate and grade, a third of its step).
    return socket.socket(listener.family, listener.type, socket.IPPROTO_TCP, fileno=listener.detach())


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_healthy(url: str, proc: subprocess.Popen | None, name: str, log: Path | None, timeout: float) -> None:
    """Poll GET {url}/health until 200; fail fast if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = _log_tail(log) if log else ""
            raise ServiceError(f"{name} exited with code {proc.returncode} before it was ready:\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise ServiceError(f"{name} at {url} was not healthy after {timeout:.0f} s")


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies, even by SIGKILL, so a killed
    learner never leaves its servers running (Linux prctl PR_SET_PDEATHSIG; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def stop_process(proc: subprocess.Popen, group: bool = False) -> None:
    """SIGTERM the child, SIGKILL it after the grace period. With `group` (a child started in its
    own session) the rest of its process group (engine processes it left) is SIGKILLed after it."""

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)

    if proc.poll() is None:
        # The server alone first: it shuts its engine down in order (vLLM's engine process then
        # stops its workers and unlinks its shared memory); a SIGTERM to the whole group at once
        # cut that short and left shared-memory segments in /dev/shm on every run.
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            proc.wait()
    if group:
        send(signal.SIGKILL)


class LocalServer:
    """One `opd ROLE ARGS --port P` child process on loopback."""

    def __init__(
        self,
        role: str,
        args: list[str],
        log_dir: Path | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
        name: str | None = None,
    ) -> None:
        self.role = role
        self.name = name or role
        self.args = args
        self.port = port if port is not None else free_port()
        log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="opd-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{self.name}.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.started_at: float | None = None
        """time.monotonic() of the newest start, and of the first health check it passed."""
        self.ready_at: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cmd(self) -> list[str]:
        return [sys.executable, "-m", "opd.cli", self.role, *self.args, "--host", "127.0.0.1", "--port", str(self.port)]

    def start(self) -> "LocalServer":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
                preexec_fn=_die_with_parent,
            )  # fmt: skip
        self.started_at, self.ready_at = time.monotonic(), None
        logger.info("started %s (pid %d) at %s, log %s", self.role, self.proc.pid, self.url, self.log_path)
        return self

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Wait until healthy; a child that lost its port to another process starts again on a new one."""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                wait_healthy(self.url, self.proc, self.role, self.log_path, timeout)
                if self.ready_at is None:
                    self.ready_at = time.monotonic()
                    waited = self.ready_at - (self.started_at or self.ready_at)
                    logger.info("%s ready at %s after %.1f s", self.name, self.url, waited)
                return
            except ServiceError:
                if self.proc is None or self.proc.returncode != EXIT_PORT_IN_USE or attempt == PORT_ATTEMPTS:
                    raise
            logger.warning("%s: port %d was taken before it bound; starting on another port", self.role, self.port)
            self.port = free_port()
            self.start()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, group=True)

    def restart_if_dead(self) -> None:
        if self.proc is None or self.proc.poll() is None or self.restarts >= MAX_RESTARTS:
            return
        self.restarts += 1
        logger.warning(
            "%s (pid %d) died with code %s; restarting (%d/%d), log %s",
            self.role,
            self.proc.pid,
            self.proc.returncode,
            self.restarts,
            MAX_RESTARTS,
            self.log_path,
        )
        stop_process(self.proc, group=True)
        self.start()


def _watch(servers: list[LocalServer], stop: threading.Event) -> None:
    while not stop.wait(WATCHDOG_INTERVAL_S):
        for server in servers:
            server.restart_if_dead()


@contextmanager
def local_servers(
    servers: list[LocalServer], timeout: float = STARTUP_TIMEOUT_S, one_at_a_time: bool = False
) -> Iterator[list[str]]:
    """Start all servers at once (they load their models in parallel), or each after the one before
    is healthy (vLLM servers sharing a GPU, whose start-up memory profiles must not overlap); wait
    until each is healthy, yield their URLs, and stop them all on exit, also on error or Ctrl-C."""
    stop = threading.Event()
    watchdog = threading.Thread(target=_watch, args=(servers, stop), name="opd-watchdog", daemon=True)
    try:
        for server in servers:
            server.start()
            if one_at_a_time:
                server.wait_ready(timeout)
        for server in servers:
            server.wait_ready(timeout)
        watchdog.start()
        yield [server.url for server in servers]
    finally:
        stop.set()
        if watchdog.is_alive():
            watchdog.join()
        # all at once: each server takes seconds to shut its engine down in order
        with ThreadPoolExecutor(max_workers=max(1, len(servers))) as pool:
            list(pool.map(LocalServer.stop, servers))


@contextmanager
def local_server(
    role: str,
    args: list[str],
    log_dir: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = STARTUP_TIMEOUT_S,
) -> Iterator[str]:
    """Run one `opd ROLE ARGS` server on loopback; yield its base URL while it runs."""
    with local_servers([LocalServer(role, args, log_dir, env)], timeout) as (url,):
        yield url
