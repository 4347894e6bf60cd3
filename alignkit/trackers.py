"""Experiment trackers: where a stage's metrics go besides its own files.

``report_to`` names them: ``tensorboard`` (``<output_dir>/tensorboard``, the default), ``wandb``,
``mlflow``, ``trackio``, or ``none``. The TRL stages hand every tracker but TensorBoard to
transformers (its callbacks log each step; ours writes TensorBoard into the run directory); PPO
and eval log through :class:`Tracker`. Each tracker reads its own settings from its usual
environment variables (``WANDB_PROJECT``, ``WANDB_MODE=offline``, ``MLFLOW_TRACKING_URI``, ...), so
no API key ever passes through a config or a manifest.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from alignkit.config import ConfigError, doc
from alignkit.runstore import redact

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")  # each the name of its Python package too
PROJECT = "alignkit"  # the wandb / trackio project and the MLflow experiment unless their env says otherwise


@dataclass
class TrackingConfig:
    """The tracker keys every stage that logs metrics shares."""

    report_to: list[str] = doc("where metrics go besides the run directory's files: tensorboard, wandb, mlflow, "
                               "trackio (each needs its package), or none", default_factory=lambda: ["tensorboard"])
    run_name: str | None = doc("the run's name in the trackers (default: the output directory)", None)

    def __post_init__(self):
        self.report_to = checked_trackers(self.report_to)


def checked_trackers(report_to) -> list[str]:
    """The tracker names, checked: known, installed, ``none`` alone meaning no tracker."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if names == ["none"]:
        return []
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"report_to: unknown tracker {name!r}; expected some of {', '.join(TRACKERS)}, or none")
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"report_to: {name} is not installed; pip install {name} (or pip install "
                              f"'alignkit[{name}]'), or drop it from report_to")
    return names


def run_name(cfg, out: Path) -> str:
    return cfg.run_name or str(out)


def transformers_report_to(cfg) -> list[str]:
    """What TRL's ``report_to`` gets: every tracker but TensorBoard, which our callback writes into
    the run directory (see :func:`alignkit.training.tensorboard_callback`)."""
    return [name for name in cfg.report_to if name != "tensorboard"] or ["none"]


class Tracker:
    """The trackers of ``report_to`` for a stage that logs by itself (PPO, eval): ``log`` a step's
    numbers, ``close`` at the end. TensorBoard writes to ``<out>/tensorboard``."""

    def __init__(self, cfg, out: Path, config: dict, resumed_at: int = 0):
        self.runs: dict[str, object] = {}
        name, config = run_name(cfg, out), redact(config)
        for tracker in cfg.report_to:
            if tracker == "tensorboard":  # a resumed run drops the steps the killed one logged after its checkpoint
                from torch.utils.tensorboard import SummaryWriter

                self.runs[tracker] = SummaryWriter(log_dir=str(out / "tensorboard"),
                                                   purge_step=resumed_at + 1 if resumed_at else None)
            elif tracker == "wandb":
                import wandb

                self.runs[tracker] = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=name,
                                                config=config, dir=str(out), reinit="create_new")
            elif tracker == "mlflow":
                import mlflow

                mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT))
                self.runs[tracker] = mlflow.start_run(run_name=name)
                mlflow.log_params({k: str(v)[:250] for k, v in _flat(config).items()})
            elif tracker == "trackio":
                import trackio

                self.runs[tracker] = trackio.init(project=os.environ.get("TRACKIO_PROJECT", PROJECT), name=name,
                                                  config=config)

    def log(self, metrics: dict, step: int) -> None:
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker, run in self.runs.items():
            if tracker == "tensorboard":
                for key, value in numbers.items():
                    run.add_scalar(key, value, step)
                run.flush()
            elif tracker == "wandb":
                run.log(numbers, step=step)
            elif tracker == "mlflow":
                import mlflow

                mlflow.log_metrics({_mlflow_key(k): v for k, v in numbers.items()}, step=step)
            elif tracker == "trackio":
                import trackio

                trackio.log(numbers, step=step)

    def close(self) -> None:
        for tracker, run in self.runs.items():
            if tracker == "tensorboard":
                run.close()
            elif tracker == "mlflow":
                import mlflow

                mlflow.end_run()
            elif tracker == "trackio":
                import trackio

                trackio.finish()
            else:
                run.finish()
        self.runs = {}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _mlflow_key(key: str) -> str:
    """MLflow allows letters, digits, ``_ - . / space`` in metric names; anything else becomes ``_``."""
    return "".join(ch if ch.isalnum() or ch in "_-./ " else "_" for ch in key)
