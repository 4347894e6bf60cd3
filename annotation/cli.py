"""``alignkit annotate``: the annotation loop's verbs.

    alignkit annotate server up|down|status          local Argilla (annotation/server.py)
    alignkit annotate generate  --config FILE [K=V]  sample k responses per prompt
    alignkit annotate push      --config FILE [K=V]  create the dataset, send the records (idempotent)
    alignkit annotate users     add|list|join|leave  annotator accounts and workspace membership
    alignkit annotate simulate  --config FILE [K=V]  simulated annotators answer through the REST API
    alignkit annotate pull      --config FILE [K=V]  responses -> long-format table (incremental)
    alignkit annotate agreement --annotations FILE --out DIR   (annotation/agreement.py)
    alignkit annotate export    --config FILE [K=V]  consensus -> preference pairs, behind the kappa gate

One YAML file (configs/annotate.yaml) holds a ``common:`` section (keys every verb shares: run_dir,
mode, dataset, workspace, ...) and one section per verb; a verb reads ``common`` and then its own
section (which wins), then the KEY=VALUE overrides. Keys a verb does not know are ignored in
``common`` and are errors in its own section.

The Argilla to talk to: ARGILLA_API_URL + ARGILLA_API_KEY when both are set, else the local server
(``alignkit annotate server up``). API keys never appear in logs, manifests or reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from alignkit.config import ConfigError, _merge, describe, from_dict, parse_overrides, read_yaml
from alignkit.data import DataError

VERBS = {
    "generate": ("alignkit.annotation.candidates", "GenerateConfig", "sample k candidate responses per prompt from a model"),
    "push": ("alignkit.annotation.datasets", "PushConfig", "create the Argilla dataset and push the records (idempotent)"),
    "simulate": ("alignkit.annotation.simulate", "SimulateConfig", "simulated annotators answer through Argilla's REST API"),
    "pull": ("alignkit.annotation.pull", "PullConfig", "pull submitted responses as a long-format table (incremental)"),
    "export": ("alignkit.annotation.export", "ExportConfig", "consensus -> preference pairs JSONL, behind the agreement gate"),
}


def _config_class(verb: str):
    import importlib

    module, cls, _ = VERBS[verb]
    return getattr(importlib.import_module(module), cls)


def load_verb_config(verb: str, path: str | None, overrides: list[str] | None = None):
    """``common`` + ``<verb>`` sections of the YAML file + overrides -> the verb's config dataclass."""
    cls = _config_class(verb)
    data: dict = {}
    where = "config"
    if path:
        raw = read_yaml(path)
        unknown = sorted(set(raw) - {"common", *VERBS})
        if unknown:
            raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; expected common, {', '.join(VERBS)}")
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in (raw.get("common") or {}).items() if k in known}
        data = _merge(data, raw.get(verb) or {})
        where = f"{path}: {verb}"
    data = _merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data, where)


def _run(args) -> int:
    from alignkit.annotation.datasets import ArgillaError

    cfg = load_verb_config(args.verb, args.config, args.overrides)
    try:
        if args.verb == "generate":
            from alignkit.annotation.candidates import generate

            generate(cfg, force=args.force)
        elif args.verb == "push":
            from alignkit.annotation.datasets import push

            push(cfg)
        elif args.verb == "simulate":
            from alignkit.annotation.simulate import simulate

            simulate(cfg)
        elif args.verb == "pull":
            from alignkit.annotation.pull import pull

            pull(cfg)
        elif args.verb == "export":
            from alignkit.annotation.export import GateError, export

            try:
                export(cfg, force=args.force)
            except GateError as e:
                print(f"alignkit: export stopped: {e}", file=sys.stderr)
                return 3
    except (ArgillaError, ValueError) as e:
        if isinstance(e, (ConfigError, DataError)):
            raise  # the top-level CLI reports these (exit 2)
        print(f"alignkit: annotate {args.verb}: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # the server module's errors (not running, failed to start)
        if type(e).__name__ == "ServerError":
            print(f"alignkit: annotate {args.verb}: {e}", file=sys.stderr)
            return 1
        raise
    return 0


# --------------------------------------------------------------------------------------------
# users


def _users(args) -> int:
    from alignkit.annotation.datasets import (ArgillaError, Http, _quiet, add_to_workspace, connect, ensure_user,
                                     remove_from_workspace, sdk_client)

    try:
        conn = connect(args.server_home, start=False)
        client = sdk_client(conn)
        if args.action == "list":
            if args.workspace:
                ws = _quiet(client.workspaces, args.workspace)
                if ws is None:
                    raise ArgillaError(f"workspace {args.workspace!r} not found")
                users = list(ws.users)
            else:
                users = list(client.users)
            http = Http(conn)
            print(f"{'username':24s} {'role':10s} workspaces")
            for u in sorted(users, key=lambda u: u.username):
                spaces = ", ".join(sorted(w["name"] for w in http.get(f"/api/v1/users/{u.id}/workspaces")["items"]))
                print(f"{u.username:24s} {str(getattr(u.role, 'value', u.role)):10s} {spaces}")
            return 0
        if not args.username:
            print("alignkit: annotate users: a USERNAME is needed", file=sys.stderr)
            return 2
        if args.action == "add":
            user, password = ensure_user(client, args.username, role=args.role, password=args.password,
                                         workspace=args.workspace)
            if password and not args.password:
                print(f"created {args.role} {args.username!r}; web-UI password (shown once): {password}")
            elif password:
                print(f"created {args.role} {args.username!r}")
            else:
                print(f"{args.username!r} exists")
            if args.workspace:
                print(f"{args.username!r} is a member of workspace {args.workspace!r}")
            return 0
        user = _quiet(client.users, args.username)
        if user is None:
            raise ArgillaError(f"user {args.username!r} not found")
        if not args.workspace:
            print("alignkit: annotate users: --workspace is needed", file=sys.stderr)
            return 2
        if args.action == "join":
            add_to_workspace(client, user, args.workspace)
            print(f"{args.username!r} added to workspace {args.workspace!r}")
        else:
            remove_from_workspace(client, user, args.workspace)
            print(f"{args.username!r} removed from workspace {args.workspace!r}")
        return 0
    except ArgillaError as e:
        print(f"alignkit: annotate users: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if type(e).__name__ in ("ServerError",) or type(e).__module__.startswith("argilla"):
            print(f"alignkit: annotate users: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        raise


# --------------------------------------------------------------------------------------------


def configure_cli(p) -> None:
    p.description = __doc__
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    from alignkit.annotation import server

    server.register_cli(verbs)
    for verb, (module, cls, help_text) in VERBS.items():
        try:
            keys = describe(_config_class(verb))
        except Exception:  # a module that cannot be imported still gets its verb (the error shows when run)
            keys = "(see docs/annotation.md)"
        v = verbs.add_parser(verb, help=help_text, description=help_text,
                             epilog="config keys (YAML section 'common' or '" + verb + "', or KEY=VALUE):\n" + keys,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        v.add_argument("--config", help="YAML config (configs/annotate.yaml)")
        if verb in ("generate", "export"):
            v.add_argument("--force", action="store_true", help="run again even if completed with the same inputs")
        v.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys")
        v.set_defaults(func=_run, verb=verb, force=False)
    from alignkit.annotation import agreement

    agreement.register_cli(verbs)

    u = verbs.add_parser("users", help="annotator accounts and workspace membership",
                         description="add: create a user (if new) and add it to --workspace; list: users (of "
                                     "--workspace); join/leave: add to / remove from --workspace.")
    u.add_argument("action", choices=["add", "list", "join", "leave"])
    u.add_argument("username", nargs="?")
    u.add_argument("--role", default="annotator", choices=["annotator", "admin", "owner"])
    u.add_argument("--workspace", help="workspace name")
    u.add_argument("--password", help="web-UI password for a new user (default: generated and shown once)")
    u.add_argument("--server-home", help="local Argilla state dir (ignored when ARGILLA_API_URL/KEY are set)")
    u.set_defaults(func=_users)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
