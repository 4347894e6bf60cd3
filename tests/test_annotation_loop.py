"""The annotation loop against a REAL local Argilla 2.8 server (never mocked, never skipped):
push (twice), simulated annotators as real users, pull, agreement, gated export; every mode;
workspace isolation; no API key in any file; a push cut off by the server going down."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest
from alignkit.annotation.argilla_client import ArgillaError, Http, ensure_user, sdk_client, user_api_key
from alignkit.annotation.datasets import DatasetConfig, PushConfig, get_dataset, list_records, push
from alignkit.annotation.export import ExportConfig, export
from alignkit.annotation.gate import GateError
from alignkit.annotation.pull import PullConfig, pull
from alignkit.annotation.server import Connection
from alignkit.annotation.simulate import SimulateConfig, oracle_judge, simulate
from alignkit.cli import main as alignkit_main
from alignkit.preferences import load_preferences
from tests.argilla_fixture import argilla_server, local_config  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
ZERO_NOISE = dict(flip_prob=0.0, rating_noise=0.0, position_bias=0.0, length_bias=0.0)


def make_candidates(path: Path, n: int, k: int, seed: int = 0) -> list[dict]:
    """n demo prompts with k replies of clearly different oracle quality, in random order: the demo's
    own answer (obeys the prompt's constraint), the answer shouted twice, and a one-word reply."""
    demo = [json.loads(x) for x in (ROOT / "alignkit" / "demo" / "instructions.jsonl").read_text().splitlines()]
    rng = random.Random(seed)
    rows = []
    for i, d in enumerate(demo[:n]):
        replies = [d["output"], (d["output"].upper() + " ") * 2, "Maybe."][:k]
        rng.shuffle(replies)
        rows.append({"item_id": f"demo-{i}", "prompt": [{"role": "user", "content": d["instruction"]}],
                     "responses": [r.strip() for r in replies], "constraint": d["constraint"]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.fixture(scope="module")
def conn(argilla_server):  # noqa: F811
    return argilla_server  # the server's Connection (url, api_key)


@pytest.fixture()
def argilla_env(monkeypatch, argilla_server):  # noqa: F811
    """The CLI finds the server through the documented environment variables."""
    monkeypatch.setenv("ARGILLA_API_URL", argilla_server.url)
    monkeypatch.setenv("ARGILLA_API_KEY", argilla_server.api_key)


def run_cli(*argv) -> int:
    return alignkit_main(["annotate", *argv])


def all_keys(conn: Connection, usernames) -> list[str]:
    http, client = Http(conn), sdk_client(conn)
    return [conn.api_key] + [user_api_key(http, client.users(u).id) for u in usernames]


def assert_no_keys(paths, keys, texts=()):
    for p in paths:
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        for f in files:
            data = f.read_bytes().decode("utf-8", errors="replace")
            for k in keys:
                assert k not in data, f"an API key was written to {f}"
    for t in texts:
        for k in keys:
            assert k not in t, "an API key was printed"


# ------------------------------------------------------------------ 1. the whole loop, through the CLI


def test_whole_loop_through_the_cli(tmp_path, conn, argilla_env, capsys):
    run = tmp_path / "run"
    make_candidates(run / "candidates" / "candidates.jsonl", 10, 2)
    common = ["--config", str(ROOT / "configs" / "annotate.yaml"), f"run_dir={run}", "dataset=loop-binary",
              "workspace=loop"]
    t0 = time.time()
    assert run_cli("push", *common, "batch_size=4", "requests_in_flight=3") == 0  # three bulk requests at once
    first = json.loads((run / "push" / "manifest.json").read_text())
    assert first["status"] == "completed" and first["metrics"]["n_created"] == 10
    assert run_cli("push", *common) == 0  # again: nothing new, nothing duplicated
    second = json.loads((run / "push" / "manifest.json").read_text())
    assert second["metrics"]["n_created"] == 0 and second["metrics"]["n_skipped_existing"] == 10
    http, client = Http(conn), sdk_client(conn)
    ds = get_dataset(client, DatasetConfig(dataset="loop-binary", workspace="loop"))
    ids = [r["external_id"] for r in list_records(http, ds.id)]
    assert len(ids) == 10 == len(set(ids))
    assert ds.settings.distribution.min_submitted == 3

    # three simulated annotators (mildly noisy, biased) answer as three real users
    assert run_cli("simulate", *common, "user_prefix=loop-ann-", "flip_prob=0.05", "position_bias=0.05") == 0
    users = {u.username for u in client.workspaces("loop").users}
    assert {"loop-ann-1", "loop-ann-2", "loop-ann-3"} <= users
    recs = list(list_records(http, ds.id, include_responses=True))
    assert all(len(r["responses"]) == 3 and r["status"] == "completed" for r in recs)
    assert len({resp["user_id"] for r in recs for resp in r["responses"]}) == 3
    assert run_cli("simulate", *common, "user_prefix=loop-ann-") == 0  # again: every record already answered
    assert json.loads((run / "simulate" / "manifest.json").read_text())["metrics"]["n_submitted"] == 0

    # pull (twice: the second appends nothing), CSV too
    assert run_cli("pull", *common, "format=both") == 0
    rows = [json.loads(x) for x in (run / "pull" / "annotations.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and {r["annotator"] for r in rows} == {"loop-ann-1", "loop-ann-2", "loop-ann-3"}
    assert set(rows[0]) >= {"item_id", "annotator", "question", "value", "status", "updated_at"}
    assert run_cli("pull", *common, "format=both") == 0
    assert len((run / "pull" / "annotations.jsonl").read_text().splitlines()) == 30
    assert len((run / "pull" / "annotations.csv").read_text().splitlines()) == 31
    assert json.loads((run / "pull" / "manifest.json").read_text())["metrics"]["n_rows_appended"] == 0

    # agreement on the pulled table (CSV: any long-format table works)
    assert run_cli("agreement", "--annotations", str(run / "pull" / "annotations.csv"), "--out", str(run / "agreement")) == 0
    report = json.loads((run / "agreement" / "agreement.json").read_text())
    q = report["questions"]["preference"]
    assert q["n_items"] == 10 and q["n_raters"] == 3 and q["fleiss_kappa"] is not None

    # gated export -> pairs the reward stage can read
    assert run_cli("export", *common, "min_kappa=0.2", "bootstrap=200") == 0
    pairs = load_preferences(run / "export" / "pairs.jsonl")
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["metrics"]["gate"]["passed"]
    assert len(pairs.pairs) + sum(manifest["metrics"]["dropped"].values()) == 10
    assert len(pairs.pairs) >= 8
    print(f"whole loop: {time.time() - t0:.1f} s")

    out = capsys.readouterr()
    keys = all_keys(conn, ["loop-ann-1", "loop-ann-2", "loop-ann-3"])
    assert_no_keys([run], keys, [out.out, out.err])


# ------------------------------------------------------------------ 2. every mode: zero noise vs high noise


def expected_pairs(cands: list[dict]) -> set[tuple[str, str, str]]:
    """(item, chosen, rejected) for every pair of replies with different oracle scores."""
    out = set()
    for c in cands:
        text = c["prompt"][0]["content"]
        scores = [oracle_judge(text, r) for r in c["responses"]]
        for a in range(len(scores)):
            for b in range(len(scores)):
                if scores[a] > scores[b]:
                    out.add((c["item_id"], c["responses"][a], c["responses"][b]))
    return out


def loop(conn, run: Path, mode: str, dataset: str, prefix: str, noise: dict, min_kappa: float):
    common = dict(run_dir=str(run), mode=mode, dataset=dataset, workspace="modes",
                  aspects=["quality", "correctness", "harmfulness"])
    push(PushConfig(**common), conn=conn)
    simulate(SimulateConfig(**common, user_prefix=prefix, **noise), conn=conn)
    pull(PullConfig(**common), conn=conn)
    return export(ExportConfig(**common, min_kappa=min_kappa, bootstrap=200), force=True)


@pytest.mark.parametrize("mode", ["binary", "multivariate", "ranking"])
def test_modes_zero_noise_match_and_high_noise_gate(tmp_path, conn, mode):
    k = 3 if mode == "ranking" else 2
    clean = tmp_path / "clean"
    cands = make_candidates(clean / "candidates" / "candidates.jsonl", 8, k, seed=1)
    m = loop(conn, clean, mode, f"clean-{mode}", "clean-", ZERO_NOISE, min_kappa=0.6)
    got = {(p["item_id"], p["chosen"], p["rejected"])
           for p in (json.loads(x) for x in (clean / "export" / "pairs.jsonl").read_text().splitlines())}
    assert got == expected_pairs(cands)  # exactly what zero-noise annotators chose, mapped back through the shuffle
    gated = m["notes"]["gate_questions"][0]
    clean_kappa = m["metrics"]["fleiss_kappa"][gated]
    assert clean_kappa == pytest.approx(1.0)
    if mode == "multivariate":
        p = json.loads((clean / "export" / "pairs.jsonl").read_text().splitlines()[0])
        assert set(p["aspects_chosen"]) == {"quality", "correctness", "harmfulness"}

    noisy = tmp_path / "noisy"
    make_candidates(noisy / "candidates" / "candidates.jsonl", 8, k, seed=1)
    noise = dict(ZERO_NOISE, flip_prob=0.5, rating_noise=1.5)
    with pytest.raises(GateError, match="agreement gate failed"):
        loop(conn, noisy, mode, f"noisy-{mode}", "noisy-", noise, min_kappa=0.6)
    manifest = json.loads((noisy / "export" / "manifest.json").read_text())
    noisy_kappa = manifest["metrics"]["fleiss_kappa"][gated]
    print(f"{mode}: kappa({gated}) zero noise {clean_kappa:.3f}, high noise {noisy_kappa}")
    assert manifest["status"] == "failed" and not (noisy / "export" / "pairs.jsonl").exists()
    assert noisy_kappa is None or noisy_kappa < 0.6 < clean_kappa


def test_binary_tie_in_argilla_keeps_only_pairs_the_annotators_could_tell_apart(tmp_path, conn):
    """Pairs of equally good replies: with a Tie answer the annotators say so and the export drops
    them; without it, the same annotators' coin-flip picks would become training pairs."""
    cands = make_candidates(tmp_path / "candidates" / "candidates.jsonl", 8, 2, seed=3)
    for c in cands[:3]:  # two replies the oracle scores the same: one reply and a copy with its last space doubled
        reply = c["responses"][0]
        at = reply.rindex(" ")  # (not the first: in a bullet list that one belongs to the "- " marker)
        c["responses"] = [reply, reply[:at] + " " + reply[at:]]
    (tmp_path / "candidates" / "candidates.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cands))
    common = dict(run_dir=str(tmp_path), mode="binary", binary_tie=True, dataset="ties", workspace="modes")
    push(PushConfig(**common), conn=conn)
    labels = get_dataset(sdk_client(conn), DatasetConfig(**{k: v for k, v in common.items() if k != "run_dir"})).settings.questions["preference"].labels
    assert "tie" in labels
    simulate(SimulateConfig(**common, user_prefix="tie-", **ZERO_NOISE, tie_threshold=0.05), conn=conn)
    pull(PullConfig(**common), conn=conn)
    m = export(ExportConfig(**common, min_kappa=0.6, bootstrap=100))
    got = {p["item_id"] for p in (json.loads(x) for x in (tmp_path / "export" / "pairs.jsonl").read_text().splitlines())}
    assert got == {c["item_id"] for c in cands[3:]}
    assert m["metrics"]["dropped"]["tie"] == 3
    assert m["metrics"]["fleiss_kappa"]["preference"] == pytest.approx(1.0)


def test_export_cli_exits_nonzero_when_the_gate_fails(tmp_path, conn, argilla_env, capsys):
    run = tmp_path / "run"
    make_candidates(run / "candidates" / "candidates.jsonl", 8, 2, seed=2)
    common = ["--config", str(ROOT / "configs" / "annotate.yaml"), f"run_dir={run}", "dataset=gate-cli", "workspace=modes"]
    assert run_cli("push", *common) == 0
    assert run_cli("simulate", *common, "user_prefix=noisy-", "flip_prob=0.5") == 0
    assert run_cli("pull", *common) == 0
    assert run_cli("export", *common, "min_kappa=0.6", "bootstrap=100") == 3
    err = capsys.readouterr().err
    assert "alignkit: error: agreement gate failed" in err and "Nothing exported" in err


# ------------------------------------------------------------------ 3. workspace isolation, keys


def test_annotator_outside_the_workspace_cannot_read_or_answer(tmp_path, conn):
    run = tmp_path / "run"
    make_candidates(run / "candidates" / "candidates.jsonl", 6, 2)
    cfg = PushConfig(run_dir=str(run), dataset="private", workspace="team-a")
    push(cfg, conn=conn)
    client, http = sdk_client(conn), Http(conn)
    ds = get_dataset(client, cfg)
    record = next(list_records(http, ds.id))
    member, _ = ensure_user(client, "member-a", workspace="team-a")
    outsider, _ = ensure_user(client, "outsider-b", workspace="team-b")
    as_member = Http(Connection(conn.url, user_api_key(http, member.id)))
    as_outsider = Http(Connection(conn.url, user_api_key(http, outsider.id)))

    assert len(as_member.post(f"/api/v1/me/datasets/{ds.id}/records/search", json={})["items"]) == 6
    for call in (lambda h: h.post(f"/api/v1/me/datasets/{ds.id}/records/search", json={}),
                 lambda h: h.get(f"/api/v1/datasets/{ds.id}"),
                 lambda h: h.get(f"/api/v1/datasets/{ds.id}/records"),
                 lambda h: h.post(f"/api/v1/records/{record['id']}/responses",
                                  json={"status": "submitted", "values": {"preference": {"value": "response_1"}}})):
        with pytest.raises(ArgillaError) as e:
            call(as_outsider)
        assert e.value.status in (403, 404)
        assert conn.api_key not in str(e.value)
    # annotators cannot list records the owner's way either, even in their own workspace
    with pytest.raises(ArgillaError) as e:
        as_member.get(f"/api/v1/datasets/{ds.id}/records")
    assert e.value.status == 403
    assert all(len(r["responses"]) == 0 for r in list_records(http, ds.id, include_responses=True))

    # users verbs from the CLI; no key in what they print, nor in the push manifest
    import os

    os.environ["ARGILLA_API_URL"], os.environ["ARGILLA_API_KEY"] = conn.url, conn.api_key
    try:
        assert run_cli("users", "add", "cli-annotator", "--workspace", "team-a") == 0
        assert run_cli("users", "list", "--workspace", "team-a") == 0
        assert run_cli("users", "leave", "cli-annotator", "--workspace", "team-a") == 0
        assert "cli-annotator" not in {u.username for u in client.workspaces("team-a").users}
        assert run_cli("users", "join", "cli-annotator", "--workspace", "team-a") == 0
        assert "cli-annotator" in {u.username for u in client.workspaces("team-a").users}
    finally:
        del os.environ["ARGILLA_API_URL"], os.environ["ARGILLA_API_KEY"]
    assert_no_keys([run], all_keys(conn, ["member-a", "outsider-b", "cli-annotator"]))


# ------------------------------------------------------------------ 4. the server dies during a push


def test_push_survives_the_server_dying_mid_push(tmp_path):
    from alignkit.annotation import server

    cfg = local_config(tmp_path / "home")  # its own server: this test kills it
    info = server.up(cfg)
    try:
        run = tmp_path / "run"
        make_candidates(run / "candidates" / "candidates.jsonl", 40, 2)
        pcfg = PushConfig(run_dir=str(run), dataset="crash", workspace="crash", batch_size=2)
        killer: list[threading.Thread] = []

        def on_batch(sent, total):
            if sent == 4 and not killer:  # the server goes down from another thread, mid-push
                killer.append(threading.Thread(target=server.down, args=(cfg,)))
                killer[0].start()
            if killer:
                time.sleep(0.3)

        with pytest.raises(ArgillaError, match="cannot reach Argilla|HTTP 5"):
            push(pcfg, conn=Connection(info.url, info.api_key), on_batch=on_batch)
        killer[0].join()
        assert json.loads((run / "push" / "manifest.json").read_text())["status"] == "failed"

        info = server.up(cfg)  # back up (maybe on another port); the state survived
        conn = Connection(info.url, info.api_key)
        ds = get_dataset(sdk_client(conn), pcfg)
        partial = [r["external_id"] for r in list_records(Http(conn), ds.id)]
        assert 4 <= len(partial) < 40, f"the push was not cut off mid-way ({len(partial)} records)"

        m = push(pcfg, conn=conn)  # run again
        ids = [r["external_id"] for r in list_records(Http(conn), ds.id)]
        assert len(ids) == 40 == len(set(ids)), "every record exactly once"
        assert m["metrics"]["n_skipped_existing"] == len(partial) and m["metrics"]["n_created"] == 40 - len(partial)
        # the annotators' view (search index) has every record once too
        user, _ = ensure_user(sdk_client(conn), "crash-ann", workspace="crash")
        as_user = Http(Connection(conn.url, user_api_key(Http(conn), user.id)))
        found = as_user.post(f"/api/v1/me/datasets/{ds.id}/records/search", params={"limit": 100}, json={})
        assert sorted(i["record"]["external_id"] for i in found["items"]) == sorted(ids)
    finally:
        server.down(cfg)


def test_bulk_submit_reports_each_refused_response_and_keeps_the_rest(tmp_path, conn):
    from alignkit.annotation.simulate import annotator_records, submit

    make_candidates(tmp_path / "candidates" / "candidates.jsonl", 3, 2, seed=4)
    common = dict(run_dir=str(tmp_path), mode="binary", dataset="bulk", workspace="modes")
    push(PushConfig(**common), conn=conn)
    http = Http(conn)
    ds = get_dataset(sdk_client(conn), DatasetConfig(**{k: v for k, v in common.items() if k != "run_dir"}))
    ids = [r["id"] for r in annotator_records(http, ds.id)]
    errors = submit(http, [(ids[0], {"preference": "response_1"}), (ids[1], {"preference": "no-such-label"}),
                           (ids[2], {"preference": "response_2"})])
    assert errors[0] is None and errors[2] is None
    assert errors[1] and "no-such-label" in errors[1]
    stored = {r["id"]: [resp["values"]["preference"]["value"] for resp in r.get("responses") or []]
              for r in annotator_records(http, ds.id)}
    assert stored == {ids[0]: ["response_1"], ids[1]: [], ids[2]: ["response_2"]}
