"""Helpers of the slow tier that start, natively, the services of docker/compose.yaml:
a PostgreSQL server from the system's packages, a Prefect server on it, and processes
(`polyalign serve`) that are always stopped, their whole process group, even on failure.

Every helper raises `Unavailable` (the test skips with its one line) when what it needs is
not installed here."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class Unavailable(RuntimeError):
    """Something the topology needs is not installed on this machine."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 1.0,
             logs: Path | None = None) -> T:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}" + (f"; log tail:\n{tail(logs)}" if logs else ""))


def tail(path: Path | None, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:] if path else ""
    except OSError:
        return ""


def healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
    """Stop `proc` (started with start_new_session=True): `sig` to it, then, if it is still
    there after `timeout` seconds, SIGTERM and at last SIGKILL to its whole process group,
    which also ends whatever it left behind."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    for last in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, last)
        except ProcessLookupError:  # the group is empty
            break
        time.sleep(2 if last == signal.SIGTERM else 0)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


# exec ARGV with SIGINT at its default: a shell without job control starts background commands
# with SIGINT ignored, which Python and its children inherit, and Ctrl-C is how serving stops
_SIGINT_DEFAULT = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])"


@contextlib.contextmanager
def started(args: list[str], log: Path, sig: int = signal.SIGTERM, stop_timeout: float = 60, **kwargs: Any) -> Iterator[subprocess.Popen]:
    """Popen `args` in a new session with stdout and stderr to `log`; stopped on exit."""
    if sig == signal.SIGINT and signal.getsignal(signal.SIGINT) is signal.SIG_IGN and "user" not in kwargs:
        args = [sys.executable, "-c", _SIGINT_DEFAULT, *args]
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, **kwargs)
    try:
        yield proc
    finally:
        stop(proc, sig, stop_timeout)


# --- PostgreSQL ---------------------------------------------------------------------------

def postgres_bin() -> Path:
    """The newest PostgreSQL server binaries of the system (Debian: /usr/lib/postgresql/N/bin)."""
    candidates = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")]
    candidates = [p for p in candidates if all((p / t).exists() for t in ("initdb", "postgres", "pg_isready", "createdb", "psql"))]
    candidates.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if candidates:
        return candidates[-1]
    found = shutil.which("initdb"), shutil.which("postgres")
    if all(found):
        return Path(found[0]).parent  # type: ignore[arg-type]
    raise Unavailable("PostgreSQL server binaries (initdb, postgres) not found; `make ui-test-deps` installs them")


def _unprivileged_user() -> pwd.struct_passwd | None:
    """None when this process is not root (it runs PostgreSQL itself); else the account to run
    it as, since initdb and postgres refuse to run as root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise Unavailable("running as root and no unprivileged account (postgres, nobody) to run PostgreSQL as")


@dataclass
class Postgres:
    bindir: Path
    port: int
    user: str
    password: str
    database: str

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the database, for asyncpg (what Prefect's server takes)."""
        return f"postgresql+asyncpg://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def sql(self, query: str) -> str:
        """Run `query` with psql over TCP; its rows as unaligned text."""
        done = subprocess.run([str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user,
                               "-d", self.database, "-X", "-tA", "-v", "ON_ERROR_STOP=1", "-c", query],
                              capture_output=True, text=True, timeout=60, env=dict(os.environ, PGPASSWORD=self.password))
        if done.returncode != 0:
            raise AssertionError(f"psql {query!r}: {done.stderr.strip()}")
        return done.stdout


@contextlib.contextmanager
def postgres(logs: Path, user: str = "prefect", database: str = "prefect") -> Iterator[Postgres]:
    """A throwaway PostgreSQL server on 127.0.0.1 (a free port), password authentication over
    TCP as in docker/compose.yaml, a database `database` owned by `user`. Its data and socket
    live in a fresh folder under the system's temporary directory (pytest's is private to
    root, which the server may not be), removed afterwards."""
    bindir = postgres_bin()
    account = _unprivileged_user()
    as_user: dict[str, Any] = {}
    if account is not None:
        as_user = dict(user=account.pw_uid, group=account.pw_gid, extra_groups=[])
    root = Path(tempfile.mkdtemp(prefix="polyalign-pg-"))
    try:
        data, sock = root / "data", root / "sock"
        sock.mkdir()
        password = secrets.token_hex(12)
        (root / "pwfile").write_text(password + "\n")
        if account is not None:
            for p in (root, sock, root / "pwfile"):
                os.chown(p, account.pw_uid, account.pw_gid)
        env = dict(os.environ, LC_ALL="C", LANG="C", HOME=str(root), PGPASSWORD=password)
        env.pop("PGDATA", None)
        init = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", user, "--pwfile", str(root / "pwfile"),
                               "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"],
                              cwd=root, env=env, capture_output=True, text=True, timeout=300, **as_user)
        if init.returncode != 0:
            raise AssertionError(f"initdb failed ({init.returncode}):\n{init.stdout[-2000:]}\n{init.stderr[-2000:]}")
        port = free_port()
        args = [str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(sock),
                "-c", "fsync=off", "-c", "max_connections=100"]
        log = logs / "postgres.log"
        with started(args, log, sig=signal.SIGINT, cwd=root, env=env, **as_user) as proc:  # SIGINT: fast shutdown
            def ready() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"postgres exited ({proc.returncode}):\n{tail(log)}")
                return subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", "postgres"],
                                      capture_output=True, env=env, timeout=30).returncode == 0

            wait_for(ready, 120, "PostgreSQL", interval=0.5, logs=log)
            created = subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user, "-O", user, database],
                                     capture_output=True, text=True, env=env, timeout=120)
            if created.returncode != 0:
                raise AssertionError(f"createdb failed: {created.stderr[-2000:]}")
            yield Postgres(bindir, port, user, password, database)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- Prefect ------------------------------------------------------------------------------

@contextlib.contextmanager
def prefect_server(home: Path, logs: Path, database_url: str | None = None) -> Iterator[dict[str, str]]:
    """`prefect server start` on 127.0.0.1 (a free port), PREFECT_HOME `home`, on
    `database_url` (None: its SQLite file under `home`). Yields the environment that points
    a client (the CLI, `polyalign serve`, get_client) at it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_API_URL=url, PREFECT_UI_API_URL=url,
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    if database_url is not None:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    log = logs / "prefect-server.log"
    prefect = Path(sys.executable).with_name("prefect")
    args = [str(prefect)] if prefect.exists() else [sys.executable, "-m", "prefect"]
    with started(args + ["server", "start", "--host", "127.0.0.1", "--port", str(port)], log, env=env) as proc:
        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"prefect server exited ({proc.returncode}):\n{tail(log)}")
            return healthy(url)

        wait_for(up, 300, "the Prefect server", logs=log)
        yield env
