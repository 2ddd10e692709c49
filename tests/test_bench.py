"""The benchmark plumbing: step clocks, tqdm parsing, the shared data set, and the runner end to end on
a tiny base (no references, no timings asserted)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from bench.common import StepClock, tqdm_steps
from bench.data import hf_imagefolder, kohya_dataset

ROOT = Path(__file__).parent.parent


def test_step_clock_leaves_the_warmup_steps_out():
    clock = StepClock(warmup=2)
    # Slow first steps (compilation), then one step a second.
    for t, n in [(0.0, 1), (10.0, 2), (11.0, 3), (12.0, 4), (12.0, 4), (13.0, 5)]:
        clock.step(n, at=t)
    assert clock.steps_per_s() == 1.0
    assert clock.last == 5
    assert StepClock(warmup=10).steps_per_s() is None


def test_tqdm_steps_reads_diffusers_and_kohya_bars_split_on_carriage_returns():
    stderr = (
        b"Loading pipeline components...: 100%|##| 5/5 [00:00<00:00]\n"
        b"Steps:   0%|          | 0/8 [00:00<?, ?it/s]\rSteps:  12%|#2   | 1/8 [00:01<00:07, 1.0it/s, loss=0.1]"
        b"\rSteps:  25%|##5  | 2/8 [00:02<00:06]\n"
        b"caching latents: 100%|##| 4/4\n"
        b"steps:  50%|#####     | 4/8 [00:03<00:03, avr_loss=0.2]\r"
        b"epoch 1/2 done"
    )
    pieces = list(tqdm_steps(io.BufferedReader(io.BytesIO(stderr))))
    assert [s for _, s in pieces if s is not None] == [0, 1, 2, 4]
    assert pieces[-1] == ("epoch 1/2 done", None)


def test_every_trainer_sees_the_same_images_and_captions(tmp_path):
    kohya = kohya_dataset(tmp_path / "kohya", count=3, repeats=2, size=(40, 32))
    files = sorted((kohya / "2_sks").glob("*.png"))
    assert len(files) == 3 and Image.open(files[0]).size == (40, 32)
    # All different: intake's near-duplicate check must keep every one.
    assert len({f.read_bytes() for f in files}) == 3
    hf = hf_imagefolder(kohya, tmp_path / "hf")
    rows = [json.loads(line) for line in (hf / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6  # kohya's repeats become rows
    for row in rows:
        stem = row["file_name"].split("-")[1]
        assert (hf / row["file_name"]).read_bytes() == (kohya / "2_sks" / f"{stem}.png").read_bytes()
        assert row["text"] == (kohya / "2_sks" / f"{stem}.txt").read_text()


def test_runner_on_a_tiny_base_writes_a_record_for_every_step(tmp_path):
    out = tmp_path / "results"
    # Kept short: /gen (it trains three LoRAs first) and the fixed-step throughput run are left out;
    # the end-to-end run goes through the same script, and the cpu profile runs them all.
    only = ["prepare", "end to end", "diffusers", "kohya", "intake", "scheduler", "discord"]
    cmd = [
        sys.executable,
        "-m",
        "bench.run_all",
        "--profile",
        "tiny",
        "--families",
        "sd15",
        "--no-refs",
        "--out",
        str(out),
        "--work",
        str(tmp_path / "work"),
        "--budget-s",
        "600",
        "--only",
        *only,
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    records = json.loads((out / "results-tiny.json").read_text())
    by_step = {r["step"]: r for r in records}
    assert [r for r in records if "error" in r] == []
    e2e = by_step["end to end sd15"]
    assert e2e["metric"] == "train" and e2e["settings"]["epochs"] == 1 and e2e["settings"]["steps"] == 4
    assert e2e["first_preview_s"] is not None and e2e["samples_per_s"] is None  # 4 steps: all warm-up
    assert e2e["machine"]["host_cpus"] >= 1 and "torch" in e2e["versions"]
    assert by_step["intake"]["images_per_s_zip"] > 0
    assert by_step["scheduler 5"]["per_job_ms"] > 0
    # What could not run says why instead of vanishing from the table.
    assert by_step["diffusers sd15"]["skipped"] and by_step["kohya sd15"]["skipped"]
    ack = by_step["discord ack"]
    assert ack["settings"]["members"] == 5 and ack["interactions"] == 30 and ack["violations"] == []
    assert 0 < ack["ack_ms_p50"] <= ack["ack_ms_p99"]
    assert (out / "results-tiny.jsonl").read_text().count("\n") == len(records)


def test_gpu_profile_takes_the_flux_memory_figure_in_its_own_call():
    from argparse import Namespace

    from bench.run_all import plan

    def steps_for(only):
        args = Namespace(
            profile="gpu",
            work="/tmp/w",
            ref_python=None,
            kohya_python=None,
            kohya_path=None,
            families=["sd15"],
            only=only,
            refs=True,
        )
        return {s.name: s for s in plan(args)}

    steps = steps_for(["flux"])
    assert list(steps) == ["flux fp8_base"]
    # -s: the test's JSON line (peak VRAM, samples/s) reaches the runner's stdout as a record.
    assert steps["flux fp8_base"].metric == "train" and "-s" in steps["flux fp8_base"].argv
    assert "tests/test_flux.py" in steps["flux fp8_base"].argv
    assert "flux fp8_base" not in steps_for(None)


def test_caption_bench_runs_the_worker_s_caption_job_on_a_tiny_florence():
    cmd = [sys.executable, "-m", "bench.caption", "--profile", "tiny", "--device", "cpu", "--images", "6"]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=300).stdout
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["settings"]["batch"] for r in records] == [1, 4]
    for r in records:
        assert (
            r["metric"] == "caption"
            and r["settings"]["device"] == "cpu"
            and r["settings"]["dtype"] == "float32"
        )
        assert r["captions"] == 6 and r["example"]
        # min_new_tokens = max_new_tokens: a random model's captions run the full length, one word a token
        # (fewer only where it picks a special token, which decoding drops).
        assert 0 < r["words_per_caption"] <= r["settings"]["new_tokens"] == 8
        assert r["captions_per_s"] > 0 and r["s_per_image"] > 0 and r["load_s"] > 0 and r["total_s"] > 0
        assert r["peak_vram_mib"] is None  # no GPU: no allocator figure
    assert records[0]["captions_written"] == 6  # the first job wrote every caption file


def test_gpu_profile_captions_with_the_large_model_on_cuda():
    from argparse import Namespace

    from bench.run_all import plan

    args = Namespace(
        profile="gpu", work="/tmp/w", ref_python=None, kohya_python=None, kohya_path=None,
        families=["sd15"], only=["caption"], refs=True,
    )  # fmt: skip
    (step,) = plan(args)
    assert step.metric == "caption" and step.argv[-4:] == ["--profile", "large", "--device", "cuda"]


def test_discord_ack_bench_with_the_stub_in_its_own_process_and_an_upload():
    cmd = [sys.executable, "-m", "bench.discord_ack", "--members", "3", "--rounds", "1", "--upload", "2"]
    done = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["settings"] == {"members": 3, "rounds": 1, "stub": "own process", "upload": 2}
    # Rounds go on until the bot has taken the upload in: each round is a /gen and a /queue a member.
    assert record["rounds_run"] >= 1 and record["interactions"] == 6 * record["rounds_run"]
    assert record["violations"] == [] and record["over_3s"] == 0
    assert 0 < record["upload_interactions"] <= record["interactions"]
    assert record["upload_intake_s"] > 0


def test_gpu_profile_measures_each_speed_setting_on_its_own_and_all_together():
    from argparse import Namespace

    from bench.run_all import plan

    args = Namespace(
        profile="gpu", work="/tmp/w", ref_python=None, kohya_python=None, kohya_path=None,
        families=["sdxl"], only=["prepare", "speed"], refs=True,
    )  # fmt: skip
    steps = {s.name: s for s in plan(args)}
    assert list(steps) == [
        "prepare sdxl",
        "speed sdxl loss_one_step_late",
        "speed sdxl channels_last",
        "speed sdxl torch_compile",
        "speed sdxl all",
        "speed gen sdxl compiled",
    ]
    for name, step in steps.items():
        if name.startswith("speed sdxl"):
            argv = step.argv
            flags = argv[argv.index("--speed") + 1].split(",")
            assert set(flags) <= {"loss_one_step_late", "channels_last", "torch_compile"}
            # The MFU's FLOPs: bench/flops.py's count for SDXL at 1024², kept in bench/results.
            assert argv[argv.index("--flops") + 1].endswith("bench/results/flops-sdxl.json")
            assert step.needs == ["prepare sdxl"]
    assert steps["speed gen sdxl compiled"].argv[-2:] == ["--compile", "inductor"]
    # The same settings as the plain `loracord sdxl` step, so the two rates compare.
    args.only = ["loracord sdxl"]
    (plain,) = plan(args)
    assert steps["speed sdxl all"].argv[: len(plain.argv)] == plain.argv
    # The cpu and tiny profiles leave them out (inductor on a CPU takes minutes a graph).
    args.profile, args.families, args.only = "tiny", ["sd15"], None
    assert not [s for s in plan(args) if s.name.startswith("speed")]
