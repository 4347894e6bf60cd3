"""Session fixture `argilla_server`: a real local Argilla 2.8 server for the whole test session.

State (database, logs, pids, owner key) lives in a pytest temp dir; the server's virtualenv is
shared per machine at $ALIGNKIT_ARGILLA_VENV or ~/.cache/alignkit/argilla-venv, so it is built
once (70-85 s on 2 cores). A server that cannot start FAILS the tests that use
it, with the log tail; it never skips. Use it with `from tests.argilla_fixture import argilla_server`.
"""

import os
from pathlib import Path

import pytest
from alignkit.annotation.server import ServerConfig, ServerError, down, up


def shared_venv() -> Path:
    return Path(os.environ.get("ALIGNKIT_ARGILLA_VENV", "~/.cache/alignkit/argilla-venv")).expanduser()


def local_config(home) -> ServerConfig:
    """A config for a throwaway server: own state dir, shared venv, any free ports."""
    return ServerConfig(home=home, venv=shared_venv(), port=0, search_port=0, redis_port=0)


@pytest.fixture(scope="session")
def argilla_server(request, tmp_path_factory):
    """Connection(url, api_key) of a running local Argilla, torn down at session end.

    pytest makes one session fixture per module that imports this function (and one for conftest),
    so the server is shared through the session config: the first user starts it, the last stops it.
    """
    shared = request.config.__dict__.setdefault("_alignkit_argilla", {"users": 0})
    if "error" in shared:  # do not retry a start that already failed this session
        pytest.fail(shared["error"], pytrace=False)
    if "info" not in shared:
        cfg = local_config(tmp_path_factory.mktemp("argilla"))
        try:
            shared["info"], shared["cfg"] = up(cfg), cfg
        except ServerError as e:
            shared["error"] = f"the local Argilla server did not start (state in {cfg.home}):\n{e}"
            pytest.fail(shared["error"], pytrace=False)
    shared["users"] += 1
    try:
        yield shared["info"]
    finally:
        shared["users"] -= 1
        if shared["users"] == 0:
            down(shared.pop("cfg"))
            del shared["info"]
