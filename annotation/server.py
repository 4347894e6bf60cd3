"""A local Argilla 2.8 server for annotation: install, start, stop, inspect.

Argilla needs a database (SQLite here), Redis with an rq worker, and an Elasticsearch 8 API.
`noida-db` (one binary on PyPI) provides the last two. The server's pins (typer<0.10, httpx~=0.27)
clash with the ML stack, so it lives in its own virtualenv, built once by `ensure_server_venv`.

Layout of the state directory (`home`):
    owner.json   owner API key, web-UI password, auth secret (mode 0600; the only place secrets live)
    state.json   chosen ports and url, so `status` and `down` find a running server
    argilla.db   SQLite database;   data/  Argilla home;   noida/  search + Redis data
    logs/        install.log setup.log noida-db.log server.log worker.log (never contain the key)
    pids/        <name>.pid for each detached process

To use an existing Argilla (Docker image, HF Space) instead, set ARGILLA_API_URL and
ARGILLA_API_KEY; `connect()` then returns those and starts nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.errors import AlignkitError

SERVER_SPEC = ["argilla-server==2.8.0", "click<8.2", "huggingface_hub<1", "noida-db==0.2.3"]
PROCESSES = ("noida-db", "server", "worker")  # started in this order, stopped in reverse


def _default_home() -> Path:
    return Path(os.environ.get("ALIGNKIT_ARGILLA_HOME", "~/.cache/alignkit/argilla")).expanduser()


@dataclass
class ServerConfig:
    home: Path = field(default_factory=_default_home)
    """State directory (database, logs, pids, secrets). Env ALIGNKIT_ARGILLA_HOME overrides the default."""
    port: int = 6900
    """Port of the Argilla API and web UI. If busy, a free port is picked (0: always pick one)."""
    search_port: int = 9200
    """Port of noida-db's Elasticsearch API (same fallback rule)."""
    redis_port: int = 6379
    """Port of noida-db's Redis (same fallback rule)."""
    venv: Path | None = None
    """Virtualenv holding argilla-server and noida-db; default $ALIGNKIT_ARGILLA_VENV or `<home>/venv`."""
    username: str = "owner"
    """Owner account, for the SDK (API key) and the web UI (password)."""
    api_key: str | None = None
    """Owner API key; None: generated once and kept in `<home>/owner.json`."""
    password: str | None = None
    """Owner web-UI password; None: generated once and kept in `<home>/owner.json`."""
    ready_timeout: float = 180.0
    """Seconds to wait for `GET /api/v1/me` to answer after starting."""

    def __post_init__(self):
        self.home = Path(self.home).expanduser().resolve()
        venv = self.venv or os.environ.get("ALIGNKIT_ARGILLA_VENV") or self.home / "venv"
        self.venv = Path(venv).expanduser().resolve()


@dataclass
class Connection:
    """The Argilla to talk to: its API url and an API key."""

    url: str
    api_key: str = field(repr=False)  # keep the key out of reprs, logs, tracebacks and pytest output


class ServerError(AlignkitError, RuntimeError):
    """The local Argilla server is not running, or failed to start (exit 1)."""

    exit_code = 1


def mask(secret: str) -> str:
    return secret[:4] + "*" * 8 if secret else "?"


# ---------------------------------------------------------------- files under home

def _logs(cfg) -> Path:
    return cfg.home / "logs"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _write_json(path: Path, data: dict, mode: int = 0o644) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _secrets(cfg) -> dict:
    """Owner credentials and the auth secret, created once in owner.json (0600)."""
    path = cfg.home / "owner.json"
    data = _read_json(path)
    if not data:
        data = {"username": cfg.username, "api_key": secrets.token_urlsafe(24),
                "password": secrets.token_urlsafe(12), "auth_secret_key": secrets.token_hex(32)}
        cfg.home.mkdir(parents=True, exist_ok=True)
        _write_json(path, data, mode=0o600)
    if cfg.api_key:
        data["api_key"] = cfg.api_key
    if cfg.password:
        data["password"] = cfg.password
    return data


def _tail(path: Path, n: int = 40) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    text = path.read_text(errors="replace")
    start = text.rfind("\n=== ")  # only the latest start (logs are appended to)
    text = text[start:] if start >= 0 else text
    return f"--- last lines of {path} ---\n" + "\n".join(text.splitlines()[-n:])


# ---------------------------------------------------------------- virtualenv

def ensure_server_venv(cfg: ServerConfig) -> Path:
    """Create `cfg.venv` and install the server into it, once (a marker file records the spec).

    Returns the venv's python. Safe to call from several processes at once (file lock)."""
    py = cfg.venv / "bin" / "python"
    marker = cfg.venv / ".alignkit-spec"
    spec = " ".join(SERVER_SPEC)
    if marker.exists() and marker.read_text() == spec and py.exists():
        return py
    cfg.venv.parent.mkdir(parents=True, exist_ok=True)
    _logs(cfg).mkdir(parents=True, exist_ok=True)
    log_path = _logs(cfg) / "install.log"
    with open(str(cfg.venv) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same venv
        if marker.exists() and marker.read_text() == spec and py.exists():
            return py
        print(f"[alignkit] installing Argilla server into {cfg.venv} (one time, about a minute); "
              f"log: {log_path}", file=sys.stderr, flush=True)
        t0 = time.time()
        with open(log_path, "a") as log:
            for cmd in ([sys.executable, "-m", "venv", str(cfg.venv)],
                        [str(py), "-m", "pip", "install", "--no-input", "--progress-bar", "off", *SERVER_SPEC]):
                log.write(f"$ {' '.join(cmd)}\n")
                log.flush()
                if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=_clean_env()).returncode:
                    raise ServerError(f"installing the Argilla server failed: {' '.join(cmd)}\n{_tail(log_path)}")
        marker.write_text(spec)
        print(f"[alignkit] Argilla server installed in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return py


def _clean_env() -> dict:
    """Our environment without anything that would leak the ML stack or a user's Argilla settings."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("ARGILLA_")}


def _server_env(cfg, ports: dict, secret: dict) -> dict:
    env = _clean_env()
    env.update(
        ARGILLA_HOME_PATH=str(cfg.home / "data"),
        ARGILLA_DATABASE_URL=f"sqlite+aiosqlite:///{cfg.home / 'argilla.db'}?check_same_thread=False",
        ARGILLA_SEARCH_ENGINE="elasticsearch",
        ARGILLA_ELASTICSEARCH=f"http://127.0.0.1:{ports['search_port']}",
        ARGILLA_REDIS_URL=f"redis://127.0.0.1:{ports['redis_port']}/0",
        ARGILLA_AUTH_SECRET_KEY=secret["auth_secret_key"],
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_OFFLINE="1",
    )
    return env


# ---------------------------------------------------------------- processes

def _noida_binary(cfg) -> Path:
    found = sorted(cfg.venv.glob("lib/python*/site-packages/noida_db/noida-db"))
    if not found:
        raise ServerError(f"noida-db binary not found in {cfg.venv}")
    found[0].chmod(0o755)
    return found[0]


def _pid(cfg, name: str) -> int | None:
    """Pid of our process `name` if it is alive (not a zombie) and really ours (its command line
    points into our venv), else None."""
    path = cfg.home / "pids" / f"{name}.pid"
    if not path.exists():
        return None
    pid = int(path.read_text())
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own dead child
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    venv = _read_json(cfg.home / "state.json").get("venv", str(cfg.venv))  # the venv it was started from
    return pid if state != "Z" and venv in cmdline else None


def _spawn(cfg, name: str, argv: list, env: dict) -> None:
    (cfg.home / "pids").mkdir(parents=True, exist_ok=True)
    with open(_logs(cfg) / f"{name}.log", "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name} ===\n".encode())
        log.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=cfg.home, start_new_session=True)
    (cfg.home / "pids" / f"{name}.pid").write_text(str(proc.pid))


# Migrate the database and create the owner in one interpreter (one import of argilla_server instead
# of two: ~10 s less per start on 2 cores). Secrets come through the environment, not argv (`ps`).
_SETUP_SCRIPT = """
import os
from argilla_server.cli import app
app(["database", "migrate"], standalone_mode=False)
u = os.environ["ALIGNKIT_OWNER"]
app(["database", "users", "create", "--role", "owner", "--username", u, "--first-name", u,
     "--password", os.environ["ALIGNKIT_OWNER_PASSWORD"], "--api-key", os.environ["ALIGNKIT_OWNER_API_KEY"]],
    standalone_mode=False)  # an existing owner is skipped ("already exists")
"""


def _setup_database(cfg, py: Path, env: dict, secret: dict) -> None:
    """Migrate and create the owner; output, with secrets redacted, goes to logs/setup.log."""
    env = {**env, "ALIGNKIT_OWNER": secret["username"], "ALIGNKIT_OWNER_PASSWORD": secret["password"],
           "ALIGNKIT_OWNER_API_KEY": secret["api_key"]}
    res = subprocess.run([str(py), "-c", _SETUP_SCRIPT], env=env, cwd=cfg.home, capture_output=True, text=True)
    out = res.stdout + res.stderr
    for key in ("api_key", "password", "auth_secret_key"):
        out = out.replace(secret[key], mask(secret[key]))
    with open(_logs(cfg) / "setup.log", "a") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} database migrate + owner user ===\n{out}\n")
    if res.returncode:
        raise ServerError(f"database setup failed (exit {res.returncode}):\n{out[-3000:]}")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _pick_port(port: int) -> int:
    if port and _port_free(port):
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ports(cfg, ports: list, timeout: float) -> None:
    deadline = time.time() + timeout
    for port in ports:
        while True:
            with socket.socket() as s:
                s.settimeout(1)
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.time() > deadline or not _pid(cfg, "noida-db"):
                raise ServerError(f"noida-db did not open port {port}\n{_tail(_logs(cfg) / 'noida-db.log')}")
            time.sleep(0.2)


def _me(url: str, api_key: str, timeout: float = 3.0) -> int:
    """HTTP status of GET /api/v1/me (0 if nothing answers)."""
    req = urllib.request.Request(f"{url}/api/v1/me", headers={"X-Argilla-Api-Key": api_key})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, urllib.error.URLError):
        return 0


# ---------------------------------------------------------------- public API

def status(cfg: ServerConfig | None = None) -> dict:
    """Which processes are alive, the url, and whether the API answers with the owner key."""
    cfg = cfg or ServerConfig()
    state = _read_json(cfg.home / "state.json")
    owner = _read_json(cfg.home / "owner.json")
    url = state.get("url")
    procs = {name: _pid(cfg, name) for name in PROCESSES}
    ready = bool(url and owner and all(procs.values()) and _me(url, owner["api_key"]) == 200)
    return {"ready": ready, "url": url, "processes": procs, "home": str(cfg.home), "logs": str(_logs(cfg)),
            "username": owner.get("username"), "api_key_masked": mask(owner.get("api_key", ""))}


def up(cfg: ServerConfig | None = None) -> Connection:
    """Start noida-db, the Argilla server and its worker (detached), wait until ready.

    Idempotent: if everything already runs and answers, returns at once. A half-running server
    (some process died) is stopped and started again."""
    cfg = cfg or ServerConfig()
    secret = _secrets(cfg)
    state = _read_json(cfg.home / "state.json")
    if state.get("url") and all(_pid(cfg, n) for n in PROCESSES) and _me(state["url"], secret["api_key"]) == 200:
        return Connection(state["url"], secret["api_key"])
    down(cfg)
    try:
        return _start(cfg, secret)
    except BaseException:  # a failed or interrupted start leaves nothing running
        down(cfg)
        raise


def _start(cfg: ServerConfig, secret: dict) -> Connection:
    py = ensure_server_venv(cfg)
    t0 = time.time()
    _logs(cfg).mkdir(parents=True, exist_ok=True)
    ports = {name: _pick_port(getattr(cfg, name)) for name in ("port", "search_port", "redis_port")}
    if len(set(ports.values())) < 3:
        raise ServerError(f"port clash: {ports}")
    url = f"http://127.0.0.1:{ports['port']}"
    _write_json(cfg.home / "state.json", {**ports, "url": url, "venv": str(cfg.venv)})
    env = _server_env(cfg, ports, secret)

    _spawn(cfg, "noida-db", [str(_noida_binary(cfg)), "start", "--only", "elasticsearch,redis",
                             "--elasticsearch-port", str(ports["search_port"]),
                             "--redis-port", str(ports["redis_port"]),
                             "--data-dir", str(cfg.home / "noida")], env)
    _setup_database(cfg, py, env, secret)  # meanwhile noida-db starts
    _wait_ports(cfg, [ports["search_port"], ports["redis_port"]], timeout=60)
    _spawn(cfg, "server", [str(py), "-m", "argilla_server", "start", "--host", "127.0.0.1",
                           "--port", str(ports["port"])], env)
    _spawn(cfg, "worker", [str(py), "-m", "argilla_server", "worker"], env)

    deadline = time.time() + cfg.ready_timeout
    while (code := _me(url, secret["api_key"])) != 200:
        dead = [n for n in PROCESSES if not _pid(cfg, n)]
        if code in (401, 403):
            raise ServerError(f"{url} rejects the owner key from {cfg.home / 'owner.json'}: the database "
                              f"{cfg.home / 'argilla.db'} was created with another key. Restore owner.json "
                              f"or delete argilla.db (loses annotations).")
        if dead or time.time() > deadline:
            why = f"{', '.join(dead)} exited" if dead else f"not ready after {cfg.ready_timeout:g} s"
            logs = "\n".join(_tail(_logs(cfg) / f"{n}.log") for n in (dead or ["server", "noida-db"]))
            raise ServerError(f"Argilla server at {url}: {why}\n{logs}")
        time.sleep(1)
    with open(_logs(cfg) / "setup.log", "a") as log:
        log.write(f"ready at {url} after {time.time() - t0:.1f} s\n")
    return Connection(url, secret["api_key"])


def down(cfg: ServerConfig | None = None, timeout: float = 20.0) -> None:
    """Stop worker, server, noida-db (worker gets SIGINT: it ignores SIGTERM); SIGKILL after `timeout`."""
    cfg = cfg or ServerConfig()
    for name in reversed(PROCESSES):
        pid = _pid(cfg, name)
        if pid:
            try:
                os.killpg(pid, signal.SIGINT if name != "server" else signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.time() + timeout
            while _pid(cfg, name) and time.time() < deadline:
                time.sleep(0.2)
            if _pid(cfg, name):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                while _pid(cfg, name):
                    time.sleep(0.1)
        (cfg.home / "pids" / f"{name}.pid").unlink(missing_ok=True)


def named_server() -> Connection | None:
    """The Argilla named by ARGILLA_API_URL + ARGILLA_API_KEY when both are set, else None."""
    url, key = os.environ.get("ARGILLA_API_URL"), os.environ.get("ARGILLA_API_KEY")
    return Connection(url.rstrip("/"), key) if url and key else None


def connect(server_home: str | Path | None = None, start: bool = False) -> Connection:
    """The Argilla to use: the one ARGILLA_API_URL + ARGILLA_API_KEY name (:func:`named_server`;
    nothing is started), else the local server in ``server_home`` (default: ``ServerConfig().home``),
    started if needed with ``start=True``, else it must be up already (ServerError)."""
    if named := named_server():
        return named
    cfg = ServerConfig(home=server_home) if server_home else ServerConfig()
    if start:
        return up(cfg)
    st = status(cfg)
    if not st["ready"]:
        raise ServerError(f"no Argilla server is running in {cfg.home}: run `alignkit annotate server up` "
                          f"or set ARGILLA_API_URL and ARGILLA_API_KEY")
    return Connection(st["url"], _secrets(cfg)["api_key"])
