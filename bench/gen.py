"""``/gen`` latency through ``runner.gen.generate`` on the worker's warm pipeline cache.

Three LoRAs are trained first (one step an epoch, three epochs) on the prepared base, then:

- ``cold``: a fresh cache, so the base is loaded, moved and the LoRA loaded before the image;
- ``warm``: the same LoRA again (median of ``--repeats``);
- ``new_lora``: a LoRA not loaded yet (a file read and an adapter added; the base stays);
- ``swap``: LoRAs already loaded, a different one each call (median);
- ``no_lora``: adapters off.

``--compile BACKEND`` runs the worker's compiled mode (``LORACORD_GEN_COMPILE``): the UNet compiled
at the first LoRA (so ``cold`` includes the compile) and every later LoRA hot-swapped into its slot;
``recompiles`` counts graphs built after the cold image (0 is the goal).

Each image: the base's native size unless ``--size``, ``--steps`` steps, DPM++ 2M Karras, CFG 7,
saved as PNG with its parameters, as a member's ``/gen`` is.

    python -m bench.gen --work bench/out/sd15 --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from runner.gen.generate import generate
from runner.gen.pipelines import PipelineCache
from runner.selftest import make_demo_dataset
from runner.spec import GenSpec, LoraWeight, TrainSpec
from runner.train.loop import train

from .common import emit, log, peak_vram_mib, reset_peak
from .prepare import load_prepared
from .train_loracord import base_of


def make_loras(base: str, out: Path, device: str | None) -> list[Path]:
    data = make_demo_dataset(out / "data", count=1, repeats=1)
    spec = TrainSpec.parse(
        {
            "output_name": "genbench",
            "base": base,
            "train_data_dir": str(data),
            "output_dir": str(out / "loras"),
            "network_dim": 16,
            "network_alpha": 16,
            "max_train_epochs": 3,
            "sample_every_n_epochs": 0,
            "resolution": 64,
            "learning_rate": 1e-2,  # visibly different LoRAs after one step each
        }
    )
    result = train(spec, lambda e: None, device=device)
    if result.type != "done":
        raise SystemExit(f"could not make the LoRAs for the benchmark: {result.reason}")
    return [Path(p) for p in result.epoch_files]


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    prepared = load_prepared(args.work)
    base = base_of(prepared)
    with tempfile.TemporaryDirectory(prefix="loracord-genbench-") as tmp:
        out = Path(tmp)
        loras = make_loras(base, out, args.device)
        size = args.size or prepared.resolution

        def spec(lora: Path | None, seed: int = 1) -> GenSpec:
            return GenSpec(
                prompt="sks, red circle, simple background",
                base=base,
                output_dir=str(out / "images"),
                loras=[LoraWeight(name=str(lora), weight=0.8)] if lora else [],
                seed=seed,
                steps=args.steps,
                width=size,
                height=size,
            )

        def timed(s: GenSpec) -> float:
            started = time.monotonic()
            generate(s, cache)
            return time.monotonic() - started

        reset_peak()
        speed = {"compile_unet": True, "compile_backend": args.compile} if args.compile else {}
        cache = PipelineCache(args.device, **speed)
        cold = timed(spec(loras[0]))
        graphs = _graphs()
        warm = [timed(spec(loras[0], seed=i)) for i in range(args.repeats)]
        new_lora = [timed(spec(lora)) for lora in loras[1:]]
        swap = [timed(spec(loras[i % len(loras)], seed=i)) for i in range(args.repeats)]
        no_lora = [timed(spec(None, seed=i)) for i in range(args.repeats)]
        recompiles = _graphs() - graphs
    log(f"gen: cold {cold:.2f}s, warm {warm}, new {new_lora}, swap {swap}, none {no_lora}")
    return emit(
        "loracord",
        "gen",
        base=prepared.base,
        family=prepared.family,
        settings={
            "size": size,
            "steps": args.steps,
            "sampler": "DPM++ 2M Karras",
            "cfg": 7,
            "count": 1,
            "compile": args.compile,
        },
        cold_s=round(cold, 3),
        warm_s=round(statistics.median(warm), 3),
        new_lora_s=round(statistics.median(new_lora), 3),
        swap_s=round(statistics.median(swap), 3),
        no_lora_s=round(statistics.median(no_lora), 3),
        warm_all_s=[round(t, 3) for t in warm],
        recompiles=recompiles if args.compile else None,
        peak_vram_mib=peak_vram_mib(),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="a folder made by bench.prepare")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default=None)
    p.add_argument("--compile", default=None, help="a torch.compile backend (inductor): the compiled mode")
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
