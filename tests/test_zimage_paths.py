"""Z-Image end to end on ``tiny:zimage``: trained and used through the CLI, the worker and the bot.

The family's own behaviour (keys, objective, loading) is tested in test_zimage.py; these prove that
nothing outside ``runner/families/`` needed to know about it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from discord_stub import DiscordStub, Upload
from PIL import Image
from test_bot_journey import async_test, message_with, new_bot, png, server

from bot.cli import main
from runner.families.registry import lora_family
from runner.formats.kohya import read_lora
from runner.selftest import make_demo_dataset
from runner.spec import parse_event

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"network_dim": 4, "network_alpha": 4, "max_train_epochs": 1, "sample_steps": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("zdata"), count=2, repeats=1)


def test_cli_trains_and_generates(tmp_path, data, capsys):
    # `loracord train` and `gen` through the CLI's main in this process (test_cli runs the command
    # in its own): a fresh interpreter for each would spend most of the test importing torch.
    out = tmp_path / "out"
    sets = [a for k, v in SETTINGS.items() for a in ("--set", f"{k}={v}")]
    code = main(
        ["train", str(data), "--base", "tiny:zimage", "--name", "z", "--out", str(out), *sets, "--json"]
    )
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    events = [parse_event(line) for line in stdout.splitlines()]
    assert [e.type for e in events if e.type in ("epoch", "done")] == ["epoch", "done"]
    tensors, meta = read_lora(out / "z.safetensors")
    assert lora_family(tensors, {}) == "zimage" and meta["ss_base_model_version"] == "zimage"
    assert list((out / "sample").glob("*.png"))

    code = main([
        "gen", "sks, a red circle", "--base", "tiny:zimage", "--lora", f"{out / 'z.safetensors'}:0.8",
        "--seed", "3", "--out", str(tmp_path / "images"), "--json",
    ])  # fmt: skip
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    (event,) = [parse_event(line) for line in stdout.splitlines()]
    assert event.type == "images"
    text = Image.open(event.images[0]).info["parameters"]
    assert "<lora:z:0.8>" in text and "Seed: 3" in text


def test_worker_trains_then_generates_with_the_lora(tmp_path, data):
    spec = {
        "base": "tiny:zimage",
        "train_data_dir": str(data),
        "output_dir": str(tmp_path),
        "output_name": "w",
    }
    gen = {"base": "tiny:zimage", "prompt": "sks", "output_dir": str(tmp_path / "gen"), "steps": 2, "seed": 1}
    gen["loras"] = [{"name": str(tmp_path / "w.safetensors"), "weight": 1.0}]
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner.worker", "cpu"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    finals = []
    proc.stdin.write(json.dumps({"type": "train", "spec": {**spec, **SETTINGS}}) + "\n")
    proc.stdin.flush()
    for line in proc.stdout:
        event = parse_event(line)
        if event.type in ("done", "failed", "images"):
            finals.append(event)
            if event.type != "done":
                break
            proc.stdin.write(json.dumps({"type": "gen", "spec": gen}) + "\n")
            proc.stdin.flush()
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
    assert [e.type for e in finals] == ["done", "images"], finals
    assert "Lora hashes" in finals[1].parameters[0]


@async_test
async def test_bot_trains_and_generates_on_zimage(tmp_path):
    stub = DiscordStub()
    async with stub, server(tmp_path, stub, bases='zi = "tiny:zimage"\n') as (cfg, db, scheduler, web):
        alice = stub.add_member("alice")
        async with stub.running(new_bot(cfg, db, scheduler, web)):
            ix = await stub.command(
                alice, "train", {"name": "zeta", "trigger": "sks", "preset": "character", "base": "zi"}
            )
            await ix.original_message()
            tid = int(stub.threads()[-1]["id"])
            card = (await stub.wait_until(lambda: stub.channel_messages(tid), what="the dataset card"))[0]
            files = [Upload("a.png", png((200, 30, 30))), Upload("b.png", png((30, 30, 200)))]
            await stub.post_message(alice, tid, "pics", files=files)
            await stub.wait_until(
                lambda: card.embeds and "**2** images" in card.embeds[0]["description"], what="card update"
            )
            settings = {**SETTINGS, "mixed_precision": "no", "resolution": "64", "train_batch_size": 1}
            for key, value in settings.items():
                done = await stub.command(
                    alice, "train-set", {"key": key, "value": str(value)}, channel_id=tid
                )
                assert "saved" in (await done.original_message()).content, key
            start = await stub.click(alice, card, "lc:d:1:start")
            assert "Queued as job" in (await start.original_message()).content
            ready = await stub.wait_until(
                lambda: message_with(stub, tid, "is ready"), 180, "the end of training"
            )
            assert "epoch 1 is in your library" in ready.content

            gen = await stub.command(alice, "gen", {"prompt": "sks", "lora": "zeta", "steps": 2, "seed": 5})
            assert "Queued" in (await gen.original_message()).content
            images = await stub.wait_until(
                lambda: next((m for m in stub.channel_messages(stub.general) if m.files), None),
                120,
                "the images",
            )
            info = await stub.click(alice, images, "lc:g:2:info")
            assert "<lora:zeta:" in (await info.original_message()).content
    assert stub.violations == []


def test_the_training_adapter_is_the_owners_to_set(tmp_path):
    from botutil import TRAIN, write_config

    from bot import jobs, store
    from bot.files import member_path

    adapter = tmp_path / "zimage_turbo_training_adapter.safetensors"
    cfg = write_config(
        tmp_path,
        f'[training_adapters]\nzi = "{adapter.name}"\n[quota]\nqueued_jobs = 5\n',
        bases='zi = "tiny:zimage"\n',
    )
    db = store.open_store(cfg.store)
    make_demo_dataset(member_path(cfg.data_dir, "alice", "datasets", "ds"), count=2, repeats=1)
    job = jobs.submit_train(db, cfg, "alice", "ds", "zi", "z", dict(TRAIN))
    assert job.spec_dict["training_adapter"] == str(adapter.resolve())  # resolved beside the config
    plain = jobs.submit_train(db, cfg, "alice", "ds", "tiny", "s", dict(TRAIN))
    assert "training_adapter" not in plain.spec_dict
    with pytest.raises(jobs.JobError, match="training_adapter is the server's to set"):
        jobs.submit_train(db, cfg, "alice", "ds", "zi", "y", {**TRAIN, "training_adapter": "/etc/passwd"})
