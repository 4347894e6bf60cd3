"""The run store: one directory per stage, described by its ``manifest.json``.

A stage run goes through ``running`` to ``completed`` (or ``failed``). The manifest holds the
resolved config, the inputs with content hashes, outputs, metrics, library versions and times.
Writes are atomic (temp file + rename): a crash never leaves a manifest that says "completed"
over partial outputs. A completed stage with the same config and inputs is skipped unless forced.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from alignkit.errors import RunLockedError, UnfinishedInputError

_log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCK = ".lock"  # flock'ed for the whole of a run (main process), holding the holder's PID; not hashed
TRACKED_LIBRARIES = ("alignkit", "torch", "transformers", "trl", "datasets", "peft", "accelerate", "argilla")
# Config keys whose values must never reach a manifest, log or report.
# Matched against whole key names ("hf_token", "ARGILLA_API_KEY"), not inside them ("max_new_tokens").
SECRET_KEY_PATTERN = re.compile(r"(^|_)(api_?key|token|password|secret|secret_key)$", re.IGNORECASE)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes files private; reports and manifests are for people to read
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-Infinity) replaced by None, in dicts, lists and
    tuples: ``json.dumps`` would write them as ``NaN``/``Infinity``, which strict JSON readers reject."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as strict JSON (non-finite floats become null; ``allow_nan=False`` guards the rest)."""
    atomic_write_text(path, json.dumps(finite_json(obj), indent=2, sort_keys=False, default=str, allow_nan=False) + "\n")


def write_jsonl(path: Path, rows) -> None:
    """Write rows as JSONL atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def hash_path(path: Path) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents, sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        if path.is_dir() and p.name == LOCK:
            continue  # a run's lock file changes with every run; it is not content
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def redact(obj: Any) -> Any:
    """Replace values of secret-looking keys with '***' (recursively)."""
    if isinstance(obj, dict):
        return {k: ("***" if SECRET_KEY_PATTERN.search(str(k)) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def redact_argv(argv: list[str]) -> list[str]:
    """A command line with its secrets masked: the value of a ``KEY=VALUE`` argument whose last key
    component is secret-looking (``annotate.common.password=X``, ``api_key=X``), of a ``--flag=X`` and of
    the argument after a ``--flag`` (``--password X``, ``--api-key X``). Same rule as :func:`redact`'s
    for dict keys, with dashes read as underscores."""
    def secret(name: str) -> bool:
        return bool(SECRET_KEY_PATTERN.search(name.lstrip("-").rsplit(".", 1)[-1].replace("-", "_")))

    out, mask_next = [], False
    for arg in map(str, argv):
        if mask_next:
            out.append("***")
            mask_next = False
        elif "=" in arg and secret(arg.split("=", 1)[0]):
            out.append(arg.split("=", 1)[0] + "=***")
        elif arg.startswith("--") and secret(arg):
            out.append(arg)
            mask_next = True
        else:
            out.append(arg)
    return out


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_manifest(stage_dir: Path) -> dict | None:
    path = Path(stage_dir) / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text())


def is_main_process() -> bool:
    """True on rank 0 (or when not distributed): only it writes manifests."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class StageRun:
    """A stage's run directory and its manifest. Use :func:`stage_run` to create one."""

    stage: str
    dir: Path
    config: dict
    inputs: dict[str, dict] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    started_at: str = ""
    skipped: bool = False
    previous: dict | None = None  # manifest found on disk when the run began
    forced: bool = False

    @property
    def resuming(self) -> bool:
        """A previous attempt with the same config and inputs did not complete (and this run is not forced)."""
        return (not self.forced and bool(self.previous) and self.previous.get("status") in ("running", "failed")
                and self._same_as(self.previous))

    def clear_for_fresh_start(self, *names: str) -> None:
        """Remove what an earlier attempt left under the run directory (checkpoints, logs, cached
        measurements), unless this run resumes it: a forced run, or one with another config or
        inputs, must not pick up that attempt's checkpoints. Main process only; a file or folder
        that is not there is fine."""
        if self.resuming or not is_main_process():
            return
        for name in names:
            path = self.dir / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def _same_as(self, manifest: dict) -> bool:
        return manifest.get("config") == redact(self.config) and {
            k: v.get("hash") for k, v in manifest.get("inputs", {}).items()
        } == {k: v.get("hash") for k, v in self.inputs.items()}

    def differences_from(self, manifest: dict) -> list[str]:
        """What makes this run differ from an earlier one: config keys (dotted) and inputs whose
        value or hash changed, so a completed stage that runs again says why."""
        def flat(d: Any, prefix: str = "") -> dict:
            if not isinstance(d, dict):
                return {prefix.rstrip("."): d}
            return {k: v for key, val in d.items() for k, v in flat(val, f"{prefix}{key}.").items()}

        missing = object()  # a key one side lacks differs even from a None on the other
        old, new = flat(manifest.get("config") or {}), flat(redact(self.config))
        changed = [f"config {k}" for k in sorted(old.keys() | new.keys()) if old.get(k, missing) != new.get(k, missing)]
        old_in = {k: v.get("hash") for k, v in manifest.get("inputs", {}).items()}
        new_in = {k: v.get("hash") for k, v in self.inputs.items()}
        return changed + [f"input {k}" for k in sorted(old_in.keys() | new_in.keys())
                          if old_in.get(k, missing) != new_in.get(k, missing)] or ["the config's layout"]

    def manifest(self, status: str, error: str | None = None) -> dict:
        m = {
            "stage": self.stage,
            "status": status,
            "config": redact(self.config),
            "inputs": self.inputs,
            "outputs": self.outputs,
            "metrics": self.metrics,
            "notes": self.notes,
            "versions": library_versions(),
            "command": redact_argv(sys.argv),
            "started_at": self.started_at,
            "ended_at": _now() if status != "running" else None,
        }
        if error:
            m["error"] = error
        return m

    def write(self, status: str, error: str | None = None) -> None:
        if is_main_process():
            atomic_write_json(self.dir / MANIFEST, self.manifest(status, error))

    def path(self, name: str) -> Path:
        return self.dir / name

    def add_output(self, key: str, path: Path) -> None:
        self.outputs[key] = str(Path(path).relative_to(self.dir)) if Path(path).is_relative_to(self.dir) else str(path)


def describe_inputs(inputs: dict[str, str | Path | None]) -> dict[str, dict]:
    """Inputs as recorded in a manifest: path plus content hash (Hub names get no hash)."""
    described = {}
    for key, value in inputs.items():
        if value is None:
            continue
        p = Path(str(value))
        if p.exists():
            described[key] = {"path": str(p.resolve()), "hash": hash_path(p)}
        else:
            described[key] = {"name": str(value), "hash": None}
    return described


def producing_run(path: Path) -> tuple[Path, dict] | None:
    """The stage run that wrote ``path``: the run directory that is ``path`` or holds it directly
    (``runs/x/sft``, ``runs/x/sft/model``, ``runs/x/annotate/export/pairs.jsonl``), with its
    manifest; None for anything else (a user's file, a Hub name, a base model)."""
    for d in (path, path.parent) if path.is_dir() else (path.parent,):
        m = read_manifest(d) if (d / MANIFEST).is_file() else None
        if isinstance(m, dict) and "stage" in m and "status" in m:
            return d, m
    return None


def check_inputs_finished(inputs: dict[str, str | Path | None]) -> None:
    """Refuse an input that a stage run wrote but did not complete: a failed gate's old pairs, a
    crashed stage's half-written model, a run still going in another process."""
    for key, value in inputs.items():
        if value is None or not Path(str(value)).exists():
            continue
        found = producing_run(Path(str(value)))
        if found and found[1]["status"] != "completed":
            run_dir, m = found
            raise UnfinishedInputError(
                f"{key}: {value} comes from the {m['stage']} run in {run_dir}, whose status is {m['status']!r}"
                + (f" ({str(m['error']).splitlines()[0]})" if m.get("error") else "")
                + f"; what it left may be stale or incomplete. Run the {m['stage']} stage to completion first.")


@contextmanager
def stage_run(
    stage: str, out_dir: str | Path, config: dict, inputs: dict[str, str | Path | None], force: bool = False
) -> Iterator[StageRun]:
    """Open a stage run: skip it when already completed with the same config and inputs.

    Inside the ``with`` block, check ``run.skipped`` first. On a normal exit the manifest is written
    as completed; on an exception as failed (with the error), and the exception propagates.
    """
    out_dir = Path(out_dir)
    check_inputs_finished(inputs)
    run = StageRun(stage=stage, dir=out_dir, config=config, inputs=describe_inputs(inputs), forced=force)
    with run_lock(out_dir):
        run.previous = read_manifest(out_dir)
        if run.previous and run.previous.get("status") == "completed" and run._same_as(run.previous) and not force:
            run.skipped = True
            run.outputs, run.metrics = run.previous.get("outputs", {}), run.previous.get("metrics", {})
            yield run
            return
        if run.previous and run.previous.get("status") == "completed" and not force:
            changed = run.differences_from(run.previous)
            _log.info("%s: completed before in %s; running again because %s changed", stage, out_dir,
                      ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else ""))
        out_dir.mkdir(parents=True, exist_ok=True)
        run.started_at = _now()
        run.write("running")
        try:
            yield run
        except BaseException as exc:
            kind = "interrupted" if isinstance(exc, KeyboardInterrupt) else type(exc).__name__
            run.write("failed", error=f"{kind}: {exc}\n" + "".join(traceback.format_exc(limit=5)))
            raise
        run.write("completed")


@contextmanager
def run_lock(stage_dir: Path) -> Iterator[None]:
    """Hold ``<stage_dir>/.lock`` (an advisory ``flock``) for the ``with`` block, so two runs never
    share a stage directory; raise :class:`RunLockedError`, naming the holder's PID, when another run
    holds it. Main process only: under torchrun/accelerate the other ranks belong to rank 0's run.
    The file stays (removing it would race with a process about to lock it); the lock goes with the
    file descriptor, so a killed run never leaves it held."""
    if not is_main_process():
        yield
        return
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(stage_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunLockedError(f"{stage_dir}: another run is using this stage directory (PID {holder}); "
                                 f"wait for it to end, or give this run another output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
