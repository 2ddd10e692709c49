"""`loracord jobs …` and `loracord quota …` as an operator types them, without loading torch."""

from __future__ import annotations

import json
import subprocess
import sys

from botutil import write_config

from bot.cli import main
from runner.selftest import make_demo_dataset


def test_jobs_and_quota_commands(tmp_path, capsys):
    cfg = write_config(tmp_path, "[quota]\nqueued_jobs = 2\n[scheduling]\nseconds_per_step = 0.5\n")
    data = make_demo_dataset(tmp_path / "キャラ", count=2, repeats=2)
    c = ["--config", str(cfg.path)]
    train = ["train", str(data), "--base", "tiny", "--set", "max_train_epochs=2", "--set", "network_dim=4"]
    assert main(["jobs", "submit", *c, "--user", "alice", *train, "--name", "first"]) == 0
    # 2 images × 2 repeats × 2 epochs at 0.5 s a step, plus 2 preview rounds of the 2 default
    # prompts × 20 steps at the default 0.1 s a generation step: 4 s + 8 s.
    assert "job 1 queued: costs about 12s of GPU time, position 1" in capsys.readouterr().out
    assert (cfg.data_dir / "members" / "alice" / "datasets" / "キャラ" / "2_demo").is_dir()
    assert main(["jobs", "submit", *c, "--user", "bob", "--json", *train, "--name", "b"]) == 0
    assert json.loads(capsys.readouterr().out)["position"] == 2
    assert (
        main(["jobs", "submit", *c, "--user", "carol", "gen", "a cat", "--base", "tiny", "--set", "steps=4"])
        == 0
    )
    capsys.readouterr()
    assert main(["jobs", "list", *c, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["id"], r["position"], r["eta_s"]) for r in rows] == [(3, 1, 0.0), (1, 2, 0.0), (2, 3, 12.0)]
    assert main(["jobs", "list", *c]) == 0
    assert "starts in ~12s" in capsys.readouterr().out
    assert main(["jobs", "cancel", *c, "2"]) == 0
    assert main(["jobs", "show", *c, "2", "--json"]) == 0
    assert json.loads(_last_json(capsys))["state"] == "cancelled"
    assert main(["quota", "set", *c, "--user", "alice", "queued_jobs=1"]) == 0
    assert main(["jobs", "submit", *c, "--user", "alice", *train, "--name", "second"]) == 2
    assert "queued jobs: 2 of 1 allowed (over by 1)" in capsys.readouterr().err
    assert main(["quota", "set", *c, "--role", "patron", "stamina=5"]) == 2
    assert "key from" in capsys.readouterr().err
    assert main(["quota", "show", *c, "--user", "alice", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["quota"]["queued_jobs"] == 1 and shown["gpu_seconds_reserved"] == 12.0
    assert main(["jobs", "show", *c, "99"]) == 2
    assert "no job 99" in capsys.readouterr().err


def _last_json(capsys) -> str:
    out = capsys.readouterr().out
    return out[out.index("{") :]


def test_operator_commands_never_load_torch(tmp_path):
    cfg = write_config(tmp_path)
    code = (
        "import sys; from bot.cli import main; import bot.scheduler, bot.dispatch.local, bot.dispatch.raycluster; "
        f"main(['jobs', 'list', '--config', {str(cfg.path)!r}]); "
        f"main(['quota', 'show', '--config', {str(cfg.path)!r}, '--user', 'x']); print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "False", proc.stderr
