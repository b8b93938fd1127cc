"""Start a throwaway PostgreSQL server on loopback for a test (Debian's `postgresql` package).

`start()` returns (url, stop) or raises Unavailable with the reason (the test then skips).
As root the server runs as the `postgres` system user, since PostgreSQL refuses root.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile


class Unavailable(RuntimeError):
    pass


def _binary(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    path = found[-1] if found else shutil.which(name)
    if not path:
        raise Unavailable(f"{name} not found (apt-get install postgresql)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start():
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    prefix: list[str] = []
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            raise Unavailable("running as root and no `postgres` user to run the server") from None
        prefix = ["runuser", "-u", "postgres", "--"]
    root = tempfile.mkdtemp(prefix="ff-pg-")
    data = os.path.join(root, "data")
    if prefix:
        os.chown(root, user.pw_uid, user.pw_gid)
    port = _free_port()
    run = lambda *cmd: subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120)
    out = run(initdb, "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
    if out.returncode:
        shutil.rmtree(root, ignore_errors=True)
        raise Unavailable(f"initdb failed: {out.stderr.strip()[-300:]}")
    out = run(pg_ctl, "-D", data, "-w", "-l", os.path.join(root, "log"), "-o",
              f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    if out.returncode:
        shutil.rmtree(root, ignore_errors=True)
        raise Unavailable(f"postgres did not start: {out.stderr.strip()[-300:]}")

    def stop() -> None:
        run(pg_ctl, "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)

    return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres", stop
