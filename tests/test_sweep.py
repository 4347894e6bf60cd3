"""alignkit sweep: two SFT learning rates, each an ordinary stage run; the report (checked in
Chromium) overlays both validation curves and names the lower final validation loss; a killed
sweep resumes (done points skipped, the interrupted one from its checkpoint); winner.yaml
reproduces the winner's run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from alignkit.cli import main
from alignkit.config import ConfigError
from alignkit.loop.sweep import SweepConfig, compare_settings, curve
from alignkit.runstore import read_manifest
from tests.test_eval import CHROMIUM, CHROMIUM_ARGS

ROOT = Path(__file__).resolve().parent.parent
RATES = [1.0e-4, 3.0e-3]


def write_sweep(tmp_path, tiny_model, real_data, **extra) -> Path:
    cfg = {"stage": "sft", "output_dir": str(tmp_path / "sweep"),
           "base": {"model": str(tiny_model), "data": str(real_data / "alpaca_libre" / "alpaca_libre_ok_400.json"),
                    "on_bad_record": "drop", "max_examples": 80, "max_steps": 8, "batch_size": 4, "max_length": 96,
                    "eval_steps": 2, "logging_steps": 2, "save_steps": 2, "val_fraction": 0.2, "heldout_fraction": 0.1,
                    "lr_scheduler": "constant", "warmup_ratio": 0},
           "grid": {"learning_rate": RATES}, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_sweep_of_two_learning_rates(tiny_model, real_data, tmp_path):
    assert main(["sweep", str(write_sweep(tmp_path, tiny_model, real_data))]) == 0
    out = tmp_path / "sweep"
    result = json.loads((out / "sweep.json").read_text())
    finals = {}
    for p in result["points"]:
        assert p["status"] == "completed" and [s for s, _ in p["curve"]] == [0, 2, 4, 6, 8]  # before, every 2 steps
        history = [json.loads(line) for line in (out / "points" / p["point"] / "log_history.jsonl").read_text().splitlines()]
        finals[p["point"]] = [h["eval_loss"] for h in history if "eval_loss" in h][-1]
        assert p["final"] == finals[p["point"]]
    assert result["winner"]["point"] == min(finals, key=finals.get)
    assert "one seed per setting" in result["certainty"]

    # the winner's config reproduces its run
    winner = yaml.safe_load((out / "winner.yaml").read_text())
    assert winner["learning_rate"] == result["winner"]["values"]["learning_rate"]
    assert main(["sft", "--config", str(out / "winner.yaml")]) == 0
    rerun = [json.loads(line) for line in (out / "winner" / "log_history.jsonl").read_text().splitlines()]
    assert [h["eval_loss"] for h in rerun if "eval_loss" in h][-1] == pytest.approx(finals[result["winner"]["point"]],
                                                                                    abs=1e-6)

    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto((out / "report.html").resolve().as_uri())
            imgs = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth, e.alt])")
            assert [alt for _, _, alt in imgs] == ["validation eval_loss", "training loss"]
            assert all(complete and width > 0 for complete, width, _ in imgs)
            assert page.eval_on_selector_all("#points tbody tr", "els => els.length") == 2
            assert page.inner_text("#points tr.win th") == result["winner"]["point"]
            assert "Winner: " + result["winner"]["point"] in page.inner_text("body")
            assert all(u.startswith(("file:", "data:")) for u in requests), requests
        finally:
            browser.close()


@pytest.mark.slow
def test_an_interrupted_sweep_resumes(tiny_model, real_data, tmp_path):
    path = write_sweep(tmp_path, tiny_model, real_data)
    out = tmp_path / "sweep"
    second = out / "points" / f"learning_rate={RATES[1]}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "alignkit.cli", "sweep", str(path)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    try:  # kill the sweep and its running point together once the second point has a checkpoint
        while not list(second.glob("checkpoints/checkpoint-*/trainer_state.json")):
            assert proc.poll() is None and time.time() < deadline, "the sweep ended before the second point saved"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    first = out / "points" / f"learning_rate={RATES[0]}"
    done = read_manifest(first)
    assert done["status"] == "completed" and read_manifest(second)["status"] == "running"

    assert main(["sweep", str(path)]) == 0
    assert read_manifest(first) == done  # skipped, not run again
    resumed = read_manifest(second)
    assert resumed["status"] == "completed" and "resumed_from" in resumed["notes"]
    result = json.loads((out / "sweep.json").read_text())
    assert all(p["status"] == "completed" for p in result["points"])
    steps = [s for s, _ in curve(second, "eval_loss")]
    assert steps == [0, 2, 4, 6, 8]  # one whole curve across the interruption


def test_bad_sweeps_fail_before_anything_runs(tiny_model, real_data, tmp_path):
    with pytest.raises(ConfigError, match="non-empty list"):
        SweepConfig(grid={"learning_rate": 1e-4})
    with pytest.raises(ConfigError, match="stage"):
        SweepConfig(stage="ppo", grid={"learning_rate": [1e-4]})
    path = write_sweep(tmp_path, tiny_model, real_data, grid={"lerning_rate": [1e-4, 2e-4]})
    assert main(["sweep", str(path)]) == 2
    assert not (tmp_path / "sweep").exists()


def test_seeds_are_tested_against_their_spread():
    def row(lr, seed, final):
        return {"values": {"learning_rate": lr}, "seed": seed, "status": "completed", "final": final}

    clear = compare_settings([row(1, s, 2.0 + 0.01 * s) for s in range(3)]
                             + [row(2, s, 1.0 + 0.01 * s) for s in range(3)], "min")
    assert clear["winner"]["values"] == {"learning_rate": 2} and "clear" in clear["certainty"]
    noisy = compare_settings([row(1, s, v) for s, v in enumerate([1.0, 2.0, 3.0])]
                             + [row(2, s, v) for s, v in enumerate([1.1, 2.1, 2.7])], "min")
    assert "not clear" in noisy["certainty"]
