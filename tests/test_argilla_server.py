"""The local Argilla server, for real: install (once), up, SDK use, idempotent up, down, restart."""

import stat
import time

import pytest
from alignkit.annotation.server import Connection, ServerConfig, ServerError, connect, down, status, up

from tests.argilla_fixture import argilla_server, local_config  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


def _assert_key_not_in_logs(cfg: ServerConfig, key: str) -> None:
    logs = list((cfg.home / "logs").iterdir())
    assert {p.name for p in logs} >= {"setup.log", "noida-db.log", "server.log", "worker.log"}
    for p in logs:
        assert key not in p.read_text(errors="replace"), f"API key written to {p}"


def test_up_sdk_down_restart(tmp_path):
    import argilla as rg

    cfg = local_config(tmp_path / "home")
    t0 = time.time()
    info = up(cfg)
    print(f"first up: {time.time() - t0:.1f} s")
    st = status(cfg)
    assert st["ready"] and st["url"] == info.url and all(st["processes"].values())
    assert info.api_key not in repr(info)
    owner = cfg.home / "owner.json"
    assert stat.S_IMODE(owner.stat().st_mode) == 0o600

    # up again: the same processes answer; nothing is started a second time
    assert up(cfg) == info
    assert status(cfg)["processes"] == st["processes"]

    client = rg.Argilla(api_url=info.url, api_key=info.api_key)
    ws = rg.Workspace(name="alignkit-test").create()
    assert "alignkit-test" in [w.name for w in client.workspaces]
    assert client.me.username == "owner" and client.me.role == "owner"

    down(cfg)
    st = status(cfg)
    assert not st["ready"] and not any(st["processes"].values())
    assert not list((cfg.home / "pids").iterdir())

    # restart on the same state: owner already exists, the workspace survived
    t0 = time.time()
    info2 = up(cfg)
    print(f"restart: {time.time() - t0:.1f} s")
    assert info2.api_key == info.api_key
    client = rg.Argilla(api_url=info2.url, api_key=info2.api_key)
    assert client.workspaces(ws.name) is not None
    down(cfg)
    assert not status(cfg)["ready"]
    _assert_key_not_in_logs(cfg, info.api_key)


def test_failed_start_fails_with_log_tail_and_leaves_nothing_running(tmp_path):
    cfg = local_config(tmp_path / "home")
    cfg.ready_timeout = 0.5  # the server cannot be ready that fast
    with pytest.raises(ServerError, match=r"(?s)not ready after .*last lines of .*server\.log"):
        up(cfg)
    assert not any(status(cfg)["processes"].values())


def test_connect_prefers_existing_argilla(monkeypatch, tmp_path):
    monkeypatch.setenv("ARGILLA_API_URL", "https://argilla.example.org/")
    monkeypatch.setenv("ARGILLA_API_KEY", "external-key")
    assert connect(tmp_path, start=True) == Connection("https://argilla.example.org", "external-key")
    assert not (tmp_path / "state.json").exists()  # nothing was started


def test_session_fixture_serves_the_sdk(argilla_server):  # noqa: F811
    import argilla as rg

    client = rg.Argilla(api_url=argilla_server.url, api_key=argilla_server.api_key)
    assert client.me.role == "owner"
