"""Issue 17's side-by-side benchmarks run end to end on a tiny base (their records checked, no timings
asserted), and what a LoRA costs a warm pipeline: one file read for a new one, no base load, one
``set_adapters`` for a swap, nothing for the same LoRA again."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.gen_overhead import make_loras
from bench.run_all import PROFILES
from runner.families.registry import load_base
from runner.gen import pipelines
from runner.gen.generate import gen_images
from runner.gen.pipelines import PipelineCache
from runner.spec import GenSpec, LoraWeight

ROOT = Path(__file__).parent.parent


def run_bench(module: str, *args: str) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines()]


def test_train_overhead_bench_writes_a_record_per_base_and_batch():
    (r,) = run_bench(
        "bench.train_overhead",
        "--bases",
        "tiny:sd15",
        "--batches",
        "2",
        "--rounds",
        "2",
        "--steps",
        "1",
        "--warmup",
        "1",
    )
    assert (r["tool"], r["metric"], r["base"], r["loaded_from"]) == (
        "loracord",
        "train_overhead",
        "tiny:sd15",
        "name",
    )
    assert r["settings"]["batch"] == 2 and r["settings"]["rounds"] == 2 and r["settings"]["precision"] == "no"
    assert len(r["load_before"]) == 3 and len(r["load_after"]) == 3
    rates = r["loracord_steps_per_s"] + r["bare_steps_per_s"]
    assert len(rates) == 4 and all(v > 0 for v in rates) and len(r["round_ratios"]) == 2
    for ours, theirs, ratio in zip(
        r["loracord_steps_per_s"], r["bare_steps_per_s"], r["round_ratios"], strict=True
    ):
        assert ratio == pytest.approx(ours / theirs, rel=1e-2)
    assert len(r["ratios"]) == 2  # one pair of neighbouring steps a round after the warm-up step
    assert r["median_ratio"] == pytest.approx(statistics.median(r["ratios"]), rel=1e-3)
    assert r["meets_goal"] == (r["median_ratio"] >= r["goal"])
    assert r["loracord_step_s"] > 0 and r["bare_step_s"] > 0
    assert r["loracord_samples_per_s"] == pytest.approx(
        statistics.median(r["loracord_steps_per_s"]) * 2, rel=1e-2
    )


def test_gen_overhead_bench_counts_no_base_load_and_one_read_per_new_lora():
    (r,) = run_bench("bench.gen_overhead", *PROFILES["tiny"]["gen_overhead"])  # what run_all runs
    assert (r["metric"], r["base"], r["settings"]["size"]) == ("gen_overhead", "tiny:sd15", 64)
    assert len(r["loracord_warm_s"]) == len(r["bare_warm_s"]) == len(r["ratios"]) == 1
    assert r["median_ratio"] == pytest.approx(r["loracord_warm_s"][0] / r["bare_warm_s"][0], rel=1e-2)
    assert r["cold_s"] > 0 and r["swap_ms"] > 0 and r["set_adapters_ms"] > 0
    assert (r["new_loras"], r["new_lora_base_loads"], r["new_lora_file_reads"]) == (1, 0, 1)
    assert r["swap_file_reads"] == 0 and r["same_pipeline"] and r["base_loads"] == 1
    assert len(r["new_lora_s"]) == 1 and len(r["swap_gen_s"]) == 2


# ---- what a LoRA costs a warm pipeline ----


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_loras("tiny:sd15", tmp_path_factory.mktemp("loras"), 2)[0]


def gen(cache, tmp_path, *loras):
    spec = GenSpec(
        prompt="portrait",
        base="tiny:sd15",
        output_dir=str(tmp_path),
        loras=[LoraWeight(name=str(p), weight=w) for p, w in loras],
        seed=3,
        steps=1,
        width=64,
        height=64,
    )
    (img,) = gen_images(spec, cache)
    return np.asarray(img.image, dtype=np.int16)


class Calls:
    """Counts the calls to a method of one object, passing them through to it."""

    def __init__(self, obj, name):
        real = getattr(obj, name)
        self.count = 0

        def counted(*args, **kwargs):
            self.count += 1
            return real(*args, **kwargs)

        setattr(obj, name, counted)


def test_a_new_lora_is_one_file_read_and_a_swap_one_set_adapters(files, tmp_path, monkeypatch):
    loads, reads = [], []
    real_read = pipelines.read_lora
    monkeypatch.setattr(pipelines, "read_lora", lambda p: reads.append(p) or real_read(p))
    cache = PipelineCache("cpu", loader=lambda n: loads.append(n) or load_base(n))
    a, b = files
    first = gen(cache, tmp_path, (a, 0.8))
    warm = cache.pipeline("tiny:sd15")
    pipe, unet = warm.sampler.pipe, warm.base.unet
    assert (loads, len(reads)) == (["tiny:sd15"], 1)

    set_adapters, enable = Calls(pipe, "set_adapters"), Calls(pipe, "enable_lora")
    gen(cache, tmp_path, (b, 0.8))  # new: one read, no base load, the same pipeline
    assert (loads, len(reads)) == (["tiny:sd15"], 2)
    assert cache.pipeline("tiny:sd15") is warm and warm.sampler.pipe is pipe and warm.base.unet is unet

    calls = set_adapters.count, enable.count
    gen(cache, tmp_path, (a, 0.8))  # a swap among loaded LoRAs: no read, one set_adapters
    assert len(reads) == 2
    assert (set_adapters.count - calls[0], enable.count - calls[1]) == (1, 0)
    again = gen(cache, tmp_path, (a, 0.8))  # the same LoRA and weight: nothing to switch
    assert (set_adapters.count - calls[0], enable.count - calls[1]) == (1, 0)
    assert np.array_equal(again, first)


def test_skipped_switches_leave_the_images_as_a_fresh_cache_draws_them(files, tmp_path):
    a, b = files
    fresh = {}
    for case in [((a, 0.8),), ((b, 0.5),), (), ((a, 0.8), (b, 0.5))]:
        fresh[case] = gen(PipelineCache("cpu"), tmp_path, *case)
    assert not np.array_equal(fresh[((a, 0.8),)], fresh[()])
    cache = PipelineCache("cpu")
    for case in [
        ((a, 0.8),),
        ((b, 0.5),),
        (),
        ((a, 0.8),),
        ((a, 0.8), (b, 0.5)),
        ((a, 0.8),),
        (),
        ((b, 0.5),),
    ]:
        assert np.array_equal(gen(cache, tmp_path, *case), fresh[case]), case
