"""loracord's warm ``/gen`` against the bare diffusers pipeline call, side by side (issue 17).

In one process, for each base:

- **warm**: a ``/gen`` with a LoRA already loaded, through ``runner.gen.generate`` on the worker's
  ``PipelineCache`` (prompt encoding, sampling, decoding, the PNG with its parameters), against
  ``StableDiffusionPipeline(...)(prompt, ...)`` built by hand from the same base's modules, with the
  same LoRA loaded by ``load_lora_weights`` at the same weight, the same scheduler (DPM++ 2M Karras),
  steps, CFG and size. Rounds alternate (loracord, bare, loracord, …) after one call each to warm
  up; the figure is the median of the per-round ratios. Goal: ≤ 1.1 × bare.
- **swap**: with ``--loras`` LoRAs loaded on both sides, loracord's switch to another one
  (``PipelineCache.activate``, what a ``/gen`` does before it samples) against diffusers'
  ``set_adapters`` alone, alternating, median of each. Goal: no more than the switch itself.
- **new LoRA**: a ``/gen`` with a LoRA not loaded yet: its seconds, how many times the base was
  loaded meanwhile (the cache's loader, counted) and how many times a LoRA file was read; the
  warm pipeline must be the same object afterwards. Goal: no base load, one file read per LoRA.

    python -m bench.gen_overhead --bases tiny:sd15 random:sd15 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from runner.families.registry import load_base
from runner.formats.kohya import lora_hashes
from runner.gen import pipelines
from runner.gen.generate import generate, size_limits
from runner.gen.pipelines import PipelineCache
from runner.spec import GenSpec, LoraWeight, TrainSpec
from runner.train.network import add_lora, kohya_state_dict

from .common import emit, log
from .train_overhead import ROOT, loadable

GOAL_WARM = 1.1
PROMPT = "sks, red circle, simple background"
WEIGHT = 0.8
CFG = 7.0


def make_loras(base_name: str, folder: Path, count: int) -> tuple[list[Path], int]:
    """``count`` kohya-format LoRAs (UNet and text encoder, rank 16) with random up weights, saved as
    a training run saves them (fp16, with their hash in the metadata); and the smallest /gen size."""
    base = load_base(base_name)
    spec = TrainSpec(
        output_name="x", base=base_name, train_data_dir=".", output_dir=".", network_dim=16, network_alpha=16
    )
    add_lora(base, spec)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for name, p in [*base.unet.named_parameters(), *base.text_encoders[0].named_parameters()]:
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        tensors = kohya_state_dict(base, torch.float16)
        meta = {"ss_base_model_version": "sd_v1"}
        path = folder / f"lora{i}.safetensors"
        safetensors.torch.save_file(
            tensors, str(path), {**meta, "sshs_model_hash": lora_hashes(tensors, meta)[0]}
        )
        paths.append(path)
    return paths, size_limits(base)[0]


class Bare:
    """diffusers' pipeline put together by hand from a base's modules, as a person would call it."""

    def __init__(self, base_name: str, loras: list[Path], device: torch.device):
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

        base = load_base(base_name)
        # A1111's DPM++ 2M Karras, as loracord's sampler table sets it up.
        scheduler = DPMSolverMultistepScheduler.from_config(
            base.scheduler_config,
            timestep_spacing="linspace",
            algorithm_type="dpmsolver++",
            solver_order=2,
            use_karras_sigmas=True,
        )
        self.pipe = StableDiffusionPipeline(
            vae=base.vae,
            text_encoder=base.text_encoders[0],
            tokenizer=base.tokenizers[0],
            unet=base.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        ).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.adapters = []
        for i, path in enumerate(loras):
            self.pipe.load_lora_weights(str(path), adapter_name=f"bare{i}")
            self.adapters.append(f"bare{i}")
        self.pipe.set_adapters([self.adapters[0]], [WEIGHT])

    def __call__(self, size: int, steps: int, seed: int) -> Any:
        return self.pipe(
            PROMPT,
            negative_prompt="",
            width=size,
            height=size,
            num_inference_steps=steps,
            guidance_scale=CFG,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]


def timed(fn: Any, *args: Any, **kwargs: Any) -> float:
    started = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - started


@contextlib.contextmanager
def counting_reads() -> Iterator[list[Path]]:
    """Every LoRA file the cache reads, by path, while inside."""
    reads: list[Path] = []
    real = pipelines.read_lora

    def read(path: Path) -> Any:
        reads.append(Path(path))
        return real(path)

    pipelines.read_lora = read
    try:
        yield reads
    finally:
        pipelines.read_lora = real


def measure(args: argparse.Namespace, name: str, tmp: Path) -> dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base_name = loadable(name, args.work)
    load_before = os.getloadavg()
    log(f"gen_overhead: {name}, load {load_before[0]:.2f}")
    started = time.monotonic()
    loras, smallest = make_loras(base_name, tmp / name.replace(":", "-"), args.loras)
    size = args.size or smallest

    def spec(lora: Path, seed: int) -> GenSpec:
        return GenSpec(
            prompt=PROMPT,
            base=base_name,
            output_dir=str(tmp / "images"),
            loras=[LoraWeight(name=str(lora), weight=WEIGHT)],
            seed=seed,
            steps=args.steps,
            width=size,
            height=size,
            sampler="DPM++ 2M Karras",
            cfg_scale=CFG,
        )

    loads: list[str] = []

    def loader(name: str) -> Any:
        loads.append(name)
        return load_base(name)

    cache = PipelineCache(device, loader=loader)
    cold = timed(generate, spec(loras[0], 0), cache)
    bare = Bare(base_name, loras, device)
    bare(size, args.steps, 0)  # its first call, as loracord's cold one: first-call costs out of the rounds

    ours, theirs = [], []
    for r in range(args.rounds):
        ours.append(timed(generate, spec(loras[0], r + 1), cache))
        theirs.append(timed(bare, size, args.steps, r + 1))
        log(f"  round {r + 1}: loracord {ours[-1]:.3f} s, bare {theirs[-1]:.3f} s")
    ratios = [o / t for o, t in zip(ours, theirs, strict=True)]

    # A new LoRA: the same warm pipeline, no base load, one read of its file.
    warm = cache.pipeline(base_name)
    loads_before = len(loads)
    with counting_reads() as reads:
        new_lora = [timed(generate, spec(lora, 1), cache) for lora in loras[1:]]
    same_pipeline = cache.pipeline(base_name) is warm and warm.sampler.pipe.unet is warm.base.unet
    new_reads = len(reads)

    # Switching among loaded LoRAs: loracord's activate against set_adapters alone, alternating.
    swap, switch = [], []
    with counting_reads() as swap_reads:
        for i in range(args.swaps):
            k = i % len(loras)
            swap.append(timed(cache.activate, warm, [(loras[k], WEIGHT)]))
            switch.append(timed(bare.pipe.set_adapters, [bare.adapters[k]], [WEIGHT]))
    swap_gen = [timed(generate, spec(loras[i % len(loras)], 1), cache) for i in range(1, 1 + len(loras))]
    median = statistics.median(ratios)
    swap_s, switch_s = statistics.median(swap), statistics.median(switch)
    return emit(
        "loracord",
        "gen_overhead",
        base=name,
        loaded_from="name" if base_name == name else "single file",
        settings={
            "size": size,
            "steps": args.steps,
            "sampler": "DPM++ 2M Karras",
            "cfg": CFG,
            "lora_weight": WEIGHT,
            "loras": args.loras,
            "rounds": args.rounds,
            "swaps": args.swaps,
            "order": "loracord, bare, alternating",
        },
        load_before=[round(v, 2) for v in load_before],
        load_after=[round(v, 2) for v in os.getloadavg()],
        cold_s=round(cold, 3),
        loracord_warm_s=[round(v, 4) for v in ours],
        bare_warm_s=[round(v, 4) for v in theirs],
        ratios=[round(v, 4) for v in ratios],
        median_ratio=round(median, 4),
        goal=GOAL_WARM,
        meets_goal=median <= GOAL_WARM,
        swap_ms=round(swap_s * 1000, 3),
        set_adapters_ms=round(switch_s * 1000, 3),
        swap_ratio=round(swap_s / switch_s, 3),
        swap_file_reads=len(swap_reads),
        swap_gen_s=[round(v, 4) for v in swap_gen],
        new_lora_s=[round(v, 4) for v in new_lora],
        new_lora_base_loads=len(loads) - loads_before,
        new_lora_file_reads=new_reads,
        new_loras=len(loras) - 1,
        same_pipeline=same_pipeline,
        base_loads=len(loads),
        seconds=round(time.monotonic() - started, 2),
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bases", nargs="+", default=["tiny:sd15", "random:sd15"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=None, help="default: the smallest /gen takes (half native)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--loras", type=int, default=3, help="LoRAs made and loaded")
    p.add_argument("--swaps", type=int, default=30)
    p.add_argument("--device", default=None)
    p.add_argument(
        "--work", type=Path, default=ROOT / "bench/out", help="where full-size bases are written once"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    log(f"gen_overhead: {args}")
    with tempfile.TemporaryDirectory(prefix="loracord-genoverhead-") as tmp:
        for base in args.bases:
            measure(args, base, Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
