"""loracord's trainer (``runner.train.loop.train``) on a prepared base and data set.

Prints one record: steady-state samples/s from the ProgressEvents (timed as they arrive), time to
the first preview image (model load included), total seconds, and the allocator's peak VRAM.

    python -m bench.train_loracord --work bench/out/sd15 --batch 4 --steps 40            # throughput
    python -m bench.train_loracord --work bench/out/sd15 --batch 4 --epochs 10 --previews # end to end
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from runner.spec import SPEED_SETTINGS, EpochEvent, ProgressEvent, StageEvent, TrainSpec
from runner.train.loop import train

from .common import SHARED, StepClock, emit, log, peak_vram_mib, reset_peak
from .prepare import Prepared, load_prepared

SPEED_FLAGS = [s for s in SPEED_SETTINGS if TrainSpec.model_fields[s].annotation is bool]


def base_of(prepared: Prepared) -> str:
    # A single file of a tiny model needs its own configs, which a spec cannot name, and generation
    # sizes a folder as a full model: tiny bases go by name (the same deterministic weights that were
    # saved), full-size ones load from the single file, as members' checkpoints come.
    return prepared.base if prepared.base.startswith("tiny:") else prepared.single_file


def spec_for(args: argparse.Namespace, out: Path) -> TrainSpec:
    prepared = load_prepared(args.work)
    base = base_of(prepared)
    settings: dict[str, Any] = {
        **SHARED,
        "output_name": "bench",
        "base": base,
        "train_data_dir": prepared.kohya_data,
        "output_dir": str(out),
        "resolution": prepared.resolution,
        "train_batch_size": args.batch,
        "mixed_precision": args.precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "sample_every_n_epochs": 1 if args.previews else 0,
        "sample_steps": args.sample_steps,
        **{name: True for name in args.speed},
        **({"torch_compile_backend": args.compile_backend} if "torch_compile" in args.speed else {}),
    }
    if args.steps:
        settings |= {"max_train_epochs": None, "max_train_steps": args.steps, "save_every_n_epochs": 10000}
    else:
        settings["max_train_epochs"] = args.epochs
    return TrainSpec.parse(settings)


def run(args: argparse.Namespace) -> dict[str, Any]:
    clock = StepClock(warmup=args.warmup)
    marks: dict[str, float] = {}
    started = time.monotonic()

    def on_event(event: Any) -> None:
        now = time.monotonic() - started
        if isinstance(event, ProgressEvent):
            clock.step(event.step)
            marks.setdefault("first_step_s", now)
            marks["loss"] = event.loss
        elif isinstance(event, EpochEvent) and event.sample_images:
            marks.setdefault("first_preview_s", now)
        elif isinstance(event, StageEvent):
            marks.setdefault(f"{event.stage}_s", now)
            if event.stage == "compile" and event.seconds is not None:
                marks["compile_seconds"] = event.seconds

    reset_peak()
    with tempfile.TemporaryDirectory(prefix="loracord-bench-") as out:
        spec = spec_for(args, Path(out))
        result = train(spec, on_event, device=args.device)
    total = time.monotonic() - started
    if result.type != "done":
        raise SystemExit(f"loracord training failed: {result.reason}")
    rate = clock.steps_per_s()
    prepared = load_prepared(args.work)
    return emit(
        "loracord",
        "train",
        base=prepared.base,
        family=prepared.family,
        settings={
            "resolution": prepared.resolution,
            "batch": args.batch,
            "steps": result.steps,
            "epochs": None if args.steps else args.epochs,
            "previews": args.previews,
            "precision": args.precision,
            "gradient_checkpointing": args.gradient_checkpointing,
            "speed": args.speed,
            "warmup_steps_excluded": args.warmup,
            **SHARED,
        },
        samples_per_s=None if rate is None else round(rate * args.batch, 3),
        seconds=round(total, 2),
        first_step_s=round(marks.get("first_step_s", total), 2),
        first_preview_s=round(marks["first_preview_s"], 2) if "first_preview_s" in marks else None,
        # Setup (model load, moves, LoRA injection) ends where latent caching starts.
        setup_s=round(marks["cache_latents_s"], 2) if "cache_latents_s" in marks else None,
        final_loss=marks.get("loss"),
        peak_vram_mib=peak_vram_mib(),
        # torch_compile: the compile stage's own time, before the first step (not in samples_per_s).
        compile_s=marks.get("compile_seconds"),
        **_mfu(args.flops, prepared, None if rate is None else rate * args.batch),
    )


def _mfu(flops_file: Path | None, prepared: Prepared, samples_per_s: float | None) -> dict[str, Any]:
    """MFU from bench/flops.py's count for this family and size, on a GPU whose peak is known."""
    if flops_file is None or not flops_file.exists() or samples_per_s is None:
        return {}
    import torch

    from .flops import PEAK_BF16_DENSE, mfu

    counted = json.loads(flops_file.read_text())
    if (counted["family"], counted["resolution"]) != (prepared.family, prepared.resolution):
        return {}
    figures: dict[str, Any] = {"flops_per_sample": counted["flops_per_sample"]}
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    peak = next((v for k, v in PEAK_BF16_DENSE.items() if k in gpu), None)
    if peak:
        figures |= {
            "peak_flops": peak,
            "mfu": round(mfu(counted["flops_per_sample"], samples_per_s, peak), 4),
        }
    return figures


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="a folder made by bench.prepare")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="a fixed number of steps (throughput)")
    p.add_argument("--epochs", type=int, default=10, help="when --steps is not given")
    p.add_argument("--previews", action="store_true", help="preview images after every epoch")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--precision", default="bf16", choices=["no", "fp16", "bf16"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the steady-state rate")
    p.add_argument("--device", default=None)
    p.add_argument(
        "--speed",
        type=lambda v: [s for s in v.split(",") if s],
        default=[],
        help="speed settings to switch on, comma-separated: " + ", ".join(SPEED_FLAGS),
    )
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--flops", type=Path, default=None, help="bench/flops.py's record: adds the MFU")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    log(f"loracord: {args}")
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
