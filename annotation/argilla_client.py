"""Talking to Argilla: a REST client, the SDK client and the errors of both, users and workspaces.

The owner's operations on users and workspaces go through the Argilla SDK; records and responses
through the REST API (:class:`Http`). Every failure reaches the CLI as :class:`ArgillaError`
(exit 1) naming the request and the server's answer, never the API key.
"""

from __future__ import annotations

import functools
import logging
import secrets
import time
import warnings
from typing import Any

from alignkit.annotation.server import Connection
from alignkit.errors import AlignkitError


class ArgillaError(AlignkitError, RuntimeError):
    """A request to Argilla failed; the message names the request and the server's answer (exit 1)."""

    exit_code = 1

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------------------------
# The clients


class Http:
    """A small REST client for Argilla's v1 API. The API key travels only in the request header;
    error messages carry the method, the path and the server's detail, never the key."""

    def __init__(self, conn: Connection, timeout: float = 60.0, retries: int = 2):
        import requests

        self.url, self.timeout, self.retries = conn.url, timeout, retries
        self.session = requests.Session()
        self.session.trust_env = False  # a local server is never reached through a proxy
        self.session.headers["X-Argilla-Api-Key"] = conn.api_key

    def request(self, method: str, path: str, ok=(200, 201), retry: bool = True, **kw) -> Any:
        import requests

        attempt = 0
        while True:
            try:
                r = self.session.request(method, self.url + path, timeout=self.timeout, **kw)
            except requests.ConnectionError as e:
                if retry and attempt < self.retries:
                    attempt += 1
                    time.sleep(0.5 * 2 ** attempt)
                    continue
                raise ArgillaError(f"{method} {path}: cannot reach Argilla at {self.url} ({type(e).__name__})") from None
            if r.status_code in ok:
                return r.json() if r.content else None
            if r.status_code == 401:
                raise ArgillaError(refused_key(self.url), 401)
            if r.status_code >= 500 and retry and attempt < self.retries:
                attempt += 1
                time.sleep(0.5 * 2 ** attempt)
                continue
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ArgillaError(f"{method} {path}: HTTP {r.status_code}: {str(detail)[:500]}", r.status_code)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, **kw):
        return self.request("POST", path, **kw)

    def put(self, path, **kw):
        return self.request("PUT", path, **kw)


def refused_key(url: str) -> str:
    return (f"Argilla at {url} refused the API key (HTTP 401): check ARGILLA_API_KEY, or unset ARGILLA_API_URL "
            f"and ARGILLA_API_KEY to use the local server with the key alignkit keeps for it")


def sdk_errors(fn):
    """Let the Argilla SDK's own exceptions out of ``fn`` as ArgillaError (exit 1), with the
    SDK's class name and message (the SDK exports no public base class: it is private)."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        from argilla._exceptions import ArgillaCredentialsError, UnauthorizedError
        from argilla._exceptions import ArgillaError as SDKError

        try:
            return fn(*args, **kwargs)
        except (ArgillaCredentialsError, UnauthorizedError):
            conn = next((a for a in args if isinstance(a, Connection)), None)
            raise ArgillaError(refused_key(conn.url if conn else "the server"), 401) from None
        except SDKError as e:
            raise ArgillaError(f"{type(e).__name__}: {e}") from e

    return call


@sdk_errors
def sdk_client(conn: Connection):
    import argilla as rg

    for name in ("httpx", "argilla.sdk", "argilla"):  # per-request INFO lines drown the stage's own output
        logging.getLogger(name).setLevel(logging.WARNING)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return rg.Argilla(api_url=conn.url, api_key=conn.api_key)


@sdk_errors
def _quiet(fn, *a, **kw):
    """Call an SDK lookup that warns when something is not found (we handle None ourselves)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


# --------------------------------------------------------------------------------------------
# Users and workspaces (owner)


@sdk_errors
def ensure_workspace(client, name: str):
    import argilla as rg

    ws = _quiet(client.workspaces, name)
    if ws is None:
        ws = rg.Workspace(name=name, client=client).create()
    return ws


@sdk_errors
def ensure_user(client, username: str, role: str = "annotator", password: str | None = None,
                workspace: str | None = None) -> tuple[Any, str | None]:
    """Get or create a user (and add it to ``workspace``). Returns (user, password if created)."""
    import argilla as rg

    user = _quiet(client.users, username)
    created_password = None
    if user is None:
        created_password = password or secrets.token_urlsafe(12)
        user = rg.User(username=username, password=created_password, role=role, client=client).create()
    if workspace:
        add_to_workspace(client, user, workspace)
    return user, created_password


@sdk_errors
def add_to_workspace(client, user, workspace: str) -> None:
    ws = ensure_workspace(client, workspace)
    if user.username not in {u.username for u in ws.users}:
        user.add_to_workspace(ws)


@sdk_errors
def remove_from_workspace(client, user, workspace: str) -> None:
    ws = _quiet(client.workspaces, workspace)
    if ws is None:
        raise ArgillaError(f"workspace {workspace!r} not found")
    if user.username in {u.username for u in ws.users}:
        user.remove_from_workspace(ws)


def user_api_key(http: Http, user_id) -> str:
    """An owner reads a user's API key from ``GET /api/v1/users/{id}`` (the SDK's User has none)."""
    return http.get(f"/api/v1/users/{user_id}")["api_key"]


def user_names(http: Http) -> dict[str, str]:
    """user id -> username (owner only)."""
    return {u["id"]: u["username"] for u in http.get("/api/v1/users")["items"]}
