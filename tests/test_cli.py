"""`loracord train`, `loracord selftest` and the worker process, run as a member would run them.

A training run, the torch-free start and the worker run in their own process, from the entry points a
member and the bot use; the other commands go through the same `main` in this process, which spares
each one a fresh interpreter importing torch and diffusers (most of a CLI test's time).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bot.cli import main
from runner.cli import parse_value
from runner.selftest import make_demo_dataset
from runner.spec import parse_event

ROOT = Path(__file__).resolve().parents[1]


def loracord(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=600, **kw
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("data"), count=2, repeats=1)


def test_set_values_parse_like_kohya():
    assert parse_value("8") == 8 and parse_value("1e-4") == 1e-4 and parse_value("true") is True
    assert parse_value("1,1,0.5") == [1, 1, 0.5]
    assert parse_value("cosine") == "cosine" and parse_value("512,768") == [512, 768]


def test_train_json_events_and_files(tmp_path, data):
    out = tmp_path / "out"
    proc = loracord(
        "train",
        str(data),
        "--base",
        "tiny:sdxl",
        "--name",
        "ずんだ",
        "--out",
        str(out),
        "--trigger",
        "sks",
        "--set",
        "network_dim=8",
        "--set",
        "network_alpha=4",
        "--set",
        "max_train_epochs=2",
        "--set",
        "sample_steps=2",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    events = [parse_event(line) for line in proc.stdout.splitlines()]
    assert [e.type for e in events if e.type in ("epoch", "done")] == ["epoch", "epoch", "done"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "ずんだ-000001.safetensors",
        "ずんだ-000002.safetensors",
        "ずんだ.safetensors",
    ]
    assert len(list((out / "sample").glob("*.png"))) >= 2


def test_train_refuses_bad_settings_with_one_line(tmp_path, data, capsys):
    code = main(
        ["train", str(data), "--base", "tiny:sd15", "--name", "x", "--out", str(tmp_path)]
        + ["--set", "network_dim=0"]
    )
    assert code == 2
    assert capsys.readouterr().err.strip() == "error: network_dim must be between 1 and 1024 (got 0)"
    code = main(
        ["train", str(tmp_path / "nothing"), "--base", "tiny:sd15", "--name", "x", "--out", str(tmp_path)]
        + ["--set", "sample_every_n_epochs=0"]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err


def test_config_file_and_set_precedence(tmp_path, data, capsys):
    config = tmp_path / "c.toml"
    config.write_text(
        "[network]\nnetwork_dim = 8\nnetwork_alpha = 8\n[training]\nmax_train_epochs = 1\n"
        "sample_every_n_epochs = 0\n",
        encoding="utf-8",
    )
    code = main(
        ["train", str(data), "--base", "tiny:sd15", "--name", "c", "--out", str(tmp_path / "o")]
        + ["--config", str(config), "--set", "network_alpha=2", "--json"]
    )
    assert code == 0, capsys.readouterr().err
    from safetensors import safe_open

    with safe_open(str(tmp_path / "o" / "c.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("8", "2.0")


def test_bot_cli_never_loads_torch():
    code = "import sys, bot.cli; bot.cli.main(['--help']); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_worker_streams_events_and_obeys_cancel(tmp_path, data):
    spec = {
        "base": "tiny:sd15",
        "train_data_dir": str(data),
        "output_dir": str(tmp_path),
        "output_name": "w",
        "max_train_epochs": 50,
        "sample_every_n_epochs": 0,
        "network_dim": 4,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner.worker", "cpu"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    proc.stdin.write(json.dumps({"type": "train", "spec": spec}) + "\n")
    proc.stdin.flush()
    events = []
    for line in proc.stdout:
        event = parse_event(line)
        events.append(event)
        if event.type == "epoch":
            proc.stdin.write('{"type": "cancel"}\n')
            proc.stdin.flush()
        if event.type in ("done", "failed"):
            break
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
    assert events[-1].type == "failed" and events[-1].kind == "cancelled"
    assert (tmp_path / "w-000001.safetensors").exists()
    assert max(e.epoch for e in events if e.type == "progress") <= 2


def test_worker_refuses_bad_job_lines():
    proc = subprocess.run(
        [sys.executable, "-m", "runner.worker"],
        input='not json\n{"type": "train", "spec": {"network_dim": 8}}\n',
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    events = [parse_event(line) for line in proc.stdout.splitlines()]
    assert [e.kind for e in events] == ["bad_input", "bad_input"]
    assert "base" in events[1].reason and "field required" in events[1].reason.lower()


def test_selftest_passes(capsys):
    code = main(["selftest"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "selftest passed" in out and "[FAIL]" not in out
