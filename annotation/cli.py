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
Failures reach ``alignkit`` as errors with an exit code: 1 Argilla or its server, 2 config or data,
3 a failed agreement gate. ``python -m alignkit.annotation.cli VERB ...`` is ``alignkit annotate VERB ...``.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys

from alignkit.annotation.argilla_client import (ArgillaError, Http, _quiet, add_to_workspace, ensure_user,
                                                remove_from_workspace, sdk_client, sdk_errors)
from alignkit.annotation.server import ServerConfig, connect, down, status, up
from alignkit.config import ConfigError, add_config_args, from_dict, merge, parse_overrides, read_yaml
from alignkit.errors import AlignkitError

# The config-driven verbs: verb -> (module, config class, help). Each module has a function named
# after its verb that runs it: generate(cfg, force), push(cfg), simulate(cfg), pull(cfg), export(cfg, force).
VERBS = {
    "generate": ("alignkit.annotation.candidates", "GenerateConfig", "sample k candidate responses per prompt from a model"),
    "push": ("alignkit.annotation.datasets", "PushConfig", "create the Argilla dataset and push the records (idempotent)"),
    "simulate": ("alignkit.annotation.simulate", "SimulateConfig", "simulated annotators answer through Argilla's REST API"),
    "pull": ("alignkit.annotation.pull", "PullConfig", "pull submitted responses as a long-format table (incremental)"),
    "export": ("alignkit.annotation.export", "ExportConfig", "consensus -> preference pairs JSONL, behind the agreement gate"),
}
SKIPPED_WHEN_DONE = ("generate", "export")  # the verbs whose completed runs are skipped (--force redoes them)


def config_class(verb: str):
    """The config dataclass of a verb of :data:`VERBS`."""
    module, cls, _ = VERBS[verb]
    return getattr(importlib.import_module(module), cls)


def check_sections(sections: dict, where: str) -> None:
    """ConfigError for a section of an annotate config that is neither ``common`` nor a verb, and
    for a key of ``common`` that no verb knows (a typo there would otherwise vanish: every verb
    ignores the common keys it does not use)."""
    unknown = sorted(set(sections) - {"common", *VERBS})
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(unknown)}; expected common, {', '.join(VERBS)}")
    known = {f.name for verb in VERBS for f in dataclasses.fields(config_class(verb))}
    stray = sorted(set(sections.get("common") or {}) - known)
    if stray:
        raise ConfigError(f"{where}: common: unknown key(s) {', '.join(stray)}; known keys: {', '.join(sorted(known))}")


def verb_config(verb: str, common: dict, section: dict, where: str):
    """The verb's config: the keys of ``common`` its config class knows (the others are for other
    verbs), then ``section`` on top. An unknown key in ``section`` is a ConfigError naming ``where``."""
    cls = config_class(verb)
    known = {f.name for f in dataclasses.fields(cls)}
    return from_dict(cls, merge({k: v for k, v in (common or {}).items() if k in known}, section or {}), where)


def load_verb_config(verb: str, path: str | None, overrides: list[str] | None = None):
    """``common`` + ``<verb>`` sections of the YAML file + overrides -> the verb's config dataclass."""
    raw: dict = read_yaml(path) if path else {}
    if path:
        check_sections(raw, str(path))
    section = merge(raw.get(verb) or {}, parse_overrides(overrides or []))
    return verb_config(verb, raw.get("common") or {}, section, f"{path}: {verb}" if path else "config")


# --------------------------------------------------------------------------------------------
# Handlers: each returns the exit code; the errors it lets out carry theirs (alignkit prints them)


def _run(args) -> int:
    cfg = load_verb_config(args.verb, args.config, args.overrides)
    run = getattr(importlib.import_module(VERBS[args.verb][0]), args.verb)
    if args.verb in SKIPPED_WHEN_DONE:
        run(cfg, force=args.force)
    else:
        run(cfg)
    return 0


def _server(args) -> int:
    cfg = ServerConfig(port=args.port, **({"home": args.home} if args.home else {}))
    if args.action == "down":
        down(cfg)
        print(f"Argilla server in {cfg.home} stopped.")
        return 0
    if args.action == "up":
        if not status(cfg)["ready"]:
            print(f"starting the local Argilla server in {cfg.home} (about 30 s) ...", flush=True)
        up(cfg)
    st = status(cfg)
    for name, pid in st["processes"].items():
        print(f"  {name:9s} {'running, pid ' + str(pid) if pid else 'not running'}")
    if not st["ready"]:
        print(f"Argilla server: not ready (home {cfg.home}; logs in {st['logs']})")
        return 0 if args.action == "status" else 1
    print(f"Argilla server ready: {st['url']}\n"
          f"  API key:  {st['api_key_masked']}  (full key in {cfg.home / 'owner.json'}, mode 0600)\n"
          f"  web UI:   open {st['url']} and log in as '{st['username']}' with the password in owner.json\n"
          f"  logs:     {st['logs']}\n"
          f"  SDK:      from alignkit.annotation.server import connect; conn = connect()  # conn.url, conn.api_key")
    return 0


def _csv_list(s):
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


def _agreement(args) -> int:
    from alignkit.annotation.agreement import compute_agreement, load_annotations
    from alignkit.annotation.agreement_report import summary_table, write_report
    from alignkit.annotation.gate import apply_gate, raise_if_failed

    rows = load_annotations(args.annotations)
    result = compute_agreement(rows, ordinal_questions=_csv_list(args.ordinal),
                               n_bootstrap=args.bootstrap, seed=args.seed)
    result["source"] = str(args.annotations)
    questions = _csv_list(args.questions)
    if questions and args.min_kappa is None:  # with a gate, a missing question fails the gate instead
        missing = [q for q in questions if q not in result["questions"]]
        if missing:
            raise ConfigError(f"--questions names question(s) not in the data: {', '.join(missing)}")
    if args.min_kappa is not None:
        apply_gate(result, args.min_kappa, questions)
    paths = write_report(result, args.out)
    print(summary_table(result))
    flagged = [a["annotator"] for a in result["annotators"] if a["flagged"]]
    if flagged:
        print(f"annotators to check: {', '.join(map(str, flagged))}")
    print(f"report: {paths['html']}")
    if args.min_kappa is not None:
        raise_if_failed(result["gate"], f"Report: {paths['html']}")
        print(f"gate passed (min kappa {args.min_kappa:g})")
    return 0


def _users(args) -> int:
    if args.action != "list" and not args.username:
        raise AlignkitError(f"users {args.action}: a USERNAME is needed")
    if args.action in ("join", "leave") and not args.workspace:
        raise AlignkitError(f"users {args.action}: --workspace is needed")
    conn = connect(args.server_home, start=False)
    client = sdk_client(conn)
    if args.action == "list":
        _list_users(conn, client, args.workspace)
    elif args.action == "add":
        _add_user(client, args)
    else:
        user = _quiet(client.users, args.username)
        if user is None:
            raise ArgillaError(f"user {args.username!r} not found")
        if args.action == "join":
            add_to_workspace(client, user, args.workspace)
            print(f"{args.username!r} added to workspace {args.workspace!r}")
        else:
            remove_from_workspace(client, user, args.workspace)
            print(f"{args.username!r} removed from workspace {args.workspace!r}")
    return 0


def _list_users(conn, client, workspace: str | None) -> None:
    @sdk_errors
    def members():
        if not workspace:
            return list(client.users)
        ws = _quiet(client.workspaces, workspace)
        if ws is None:
            raise ArgillaError(f"workspace {workspace!r} not found")
        return list(ws.users)

    http = Http(conn)
    print(f"{'username':24s} {'role':10s} workspaces")
    for u in sorted(members(), key=lambda u: u.username):
        spaces = ", ".join(sorted(w["name"] for w in http.get(f"/api/v1/users/{u.id}/workspaces")["items"]))
        print(f"{u.username:24s} {str(getattr(u.role, 'value', u.role)):10s} {spaces}")


def _add_user(client, args) -> None:
    _, password = ensure_user(client, args.username, role=args.role, password=args.password, workspace=args.workspace)
    if password and not args.password:
        print(f"created {args.role} {args.username!r}; web-UI password (shown once): {password}")
    elif password:
        print(f"created {args.role} {args.username!r}")
    else:
        print(f"{args.username!r} exists")
    if args.workspace:
        print(f"{args.username!r} is a member of workspace {args.workspace!r}")


# --------------------------------------------------------------------------------------------
# Parsers


def configure_cli(p) -> None:
    p.description = __doc__
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    _add_server_verb(verbs)
    for verb, (_, _, help_text) in VERBS.items():
        v = verbs.add_parser(verb, help=help_text, description=help_text)
        try:
            cls = config_class(verb)
        except ImportError:  # a module that cannot be imported still gets its verb (the error shows when run)
            cls = None
        add_config_args(v, cls, "configs/annotate.yaml",
                        force_help="run again even if completed with the same inputs" if verb in SKIPPED_WHEN_DONE
                        else None)
        v.set_defaults(func=_run, verb=verb)
    _add_agreement_verb(verbs)
    _add_users_verb(verbs)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _add_server_verb(verbs) -> None:
    p = verbs.add_parser("server", help="start, stop or inspect the local Argilla server")
    p.add_argument("action", choices=["up", "down", "status"],
                   help="up: install (once) and start; down: stop; status: show processes and readiness")
    p.add_argument("--home", help="state directory (default: $ALIGNKIT_ARGILLA_HOME or ~/.cache/alignkit/argilla)")
    p.add_argument("--port", type=int, default=6900, help="port of the API and web UI (default 6900)")
    p.set_defaults(func=_server)


def _add_agreement_verb(verbs) -> None:
    p = verbs.add_parser("agreement", help="inter-annotator agreement report (Fleiss' kappa, alpha, ...)",
                         description="Inter-annotator agreement of a long-format annotation table (see "
                                     "annotation/agreement.py), written as agreement.json, report.md and "
                                     "report.html.")
    p.add_argument("--annotations", required=True, metavar="FILE",
                   help="long-format table (CSV or JSONL): item_id, annotator, question, value")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="directory for agreement.json, report.md, report.html")
    p.add_argument("--min-kappa", type=float, default=None, metavar="X",
                   help="fail (exit code 3) when a question's Fleiss' kappa is below X")
    p.add_argument("--questions", default=None, metavar="Q1,Q2",
                   help="questions the --min-kappa gate applies to (default: all)")
    p.add_argument("--ordinal", default=None, metavar="Q1,Q2",
                   help="questions that are ordinal ratings (default: auto-detect 1..5 integers)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples for the confidence intervals (default 1000)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="bootstrap seed (default 0)")
    p.set_defaults(func=_agreement)


def _add_users_verb(verbs) -> None:
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


if __name__ == "__main__":
    from alignkit.cli import main

    sys.exit(main(["annotate", *sys.argv[1:]]))
