"""`loracord gen` and `loracord grid`: generation with LoRAs from a shell."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .families.registry import FAMILIES
from .formats.infotext import parse_parameters
from .spec import FailedEvent, GenSampler, GenSpec, ImagesEvent, SpecError

BASE_HELP = (
    f"{', '.join(f'tiny:{name}' for name in FAMILIES)}, random:…, a .safetensors file or a diffusers folder"
)


def _lora_arg(item: str) -> dict[str, Any]:
    # NAME:W, or NAME alone (weight 1); the last colon splits, so paths with colons still work.
    name, sep, weight = item.rpartition(":")
    try:
        return {"name": name, "weight": float(weight)} if sep else {"name": item}
    except ValueError:
        return {"name": item}


def _size_arg(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    try:
        return int(width), int(height if sep else width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size needs WIDTHxHEIGHT, like 512x768 (got '{text}')") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--weights needs numbers separated by commas (got '{text}')"
        ) from None


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    given = {
        "base": args.base,
        "lora_dir": args.lora_dir,
        "negative_prompt": args.negative,
        "seed": args.seed,
        "steps": args.steps,
        "cfg_scale": args.cfg,
        "guidance_scale": args.guidance,
        "sampler": args.sampler,
        "clip_skip": args.clip_skip,
    }
    if args.size:
        given["width"], given["height"] = args.size
    return {k: v for k, v in given.items() if v is not None}


def _print_json(event: Any) -> None:
    print(event.model_dump_json(), flush=True)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def cmd_gen(args: argparse.Namespace) -> int:
    try:
        spec = GenSpec.parse(
            {
                **_settings(args),
                "prompt": args.prompt,
                "output_dir": args.out,
                "count": args.count,
                "loras": [_lora_arg(item) for item in args.lora or []],
            }
        )
    except SpecError as e:
        return _fail(str(e))
    from .gen.generate import run_gen
    from .gen.pipelines import PipelineCache

    result = run_gen(spec, PipelineCache(args.device), _print_json if args.json else lambda e: None)
    if isinstance(result, FailedEvent):
        print(f"error: {result.reason}", file=sys.stderr)
        return 1
    if not args.json:
        for path in result.images:
            print(path)
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        epochs = None if args.epochs == "all" else [int(e) for e in args.epochs.split(",") if e.strip()]
    except ValueError:
        return _fail(f"--epochs needs 'all' or epoch numbers like 2,4,6 (got '{args.epochs}')")
    try:
        template = GenSpec.parse({**_settings(args), "prompt": "", "output_dir": str(Path(args.out).parent)})
    except SpecError as e:
        return _fail(str(e))
    from .families.protocol import ModelError
    from .formats.kohya import LoraFileError
    from .gen.generate import lora_grid
    from .gen.pipelines import PipelineCache
    from .gen.sampler import save_png

    try:
        grid = lora_grid(template, args.name, args.weights, args.prompt, PipelineCache(args.device), epochs)
    except (SpecError, LoraFileError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(grid.image, out, grid.parameters)
    if args.json:
        seed = int(parse_parameters(grid.parameters).fields["Seed"])
        seconds = time.monotonic() - started
        _print_json(
            ImagesEvent(images=[str(out)], parameters=[grid.parameters], seeds=[seed], seconds=seconds)
        )
    else:
        print(out)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help=BASE_HELP)
    p.add_argument("--negative", help="negative prompt")
    p.add_argument("--seed", type=int, help="image i gets seed + i (default: random)")
    p.add_argument("--steps", type=int, help="sampling steps (default 20)")
    p.add_argument("--cfg", type=float, help="CFG scale (default 7; Flux: 1, no true CFG)")
    p.add_argument("--guidance", type=float, help="Flux dev's distilled guidance (default 3.5)")
    p.add_argument("--size", type=_size_arg, metavar="WxH", help="default: the base's native size")
    p.add_argument(
        "--sampler",
        metavar="NAME",
        help=f"A1111's name (default DPM++ 2M Karras): {', '.join(GenSampler.__args__)}",
    )
    p.add_argument("--clip-skip", type=int)
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when there is one)")
    p.add_argument("--json", action="store_true", help="print the result as a JSON event")


def add_gen_commands(sub: Any) -> None:
    """The `gen` and `grid` subcommands, on the runner CLI's subparsers."""
    g = sub.add_parser(
        "gen",
        help="generate images, with LoRAs",
        description="Text to image. LoRAs come from <lora:NAME:0.8> in the prompt (as in A1111) or --lora; "
        "every PNG carries A1111's parameters, so PNG Info and Civitai read it.",
    )
    g.add_argument("prompt")
    _common(g)
    g.add_argument("--lora-dir", help="folder of LoRA .safetensors files, found by file name")
    g.add_argument(
        "--lora",
        action="append",
        metavar="NAME:W",
        help="a LoRA by name or path, with its weight (repeatable)",
    )
    g.add_argument("--count", type=int, default=1, help="images (default 1)")
    g.add_argument("--out", default="outputs", help="folder for the PNGs (default: outputs)")
    g.set_defaults(func=cmd_gen)

    r = sub.add_parser(
        "grid",
        help="one image of a LoRA's epochs × weights × prompts",
        description="Render every saved epoch of a training run (rows) at each weight (columns), same seed.",
    )
    r.add_argument("prompt", nargs="+", help="one or more prompts (rows per epoch)")
    _common(r)
    r.add_argument("--lora-dir", required=True, help="the training run's output folder")
    r.add_argument("--name", required=True, help="the LoRA's name: NAME-000001.safetensors …")
    r.add_argument("--weights", type=_floats, default=[0.4, 0.6, 0.8, 1.0], help="default 0.4,0.6,0.8,1.0")
    r.add_argument("--epochs", default="all", help="'all' or epoch numbers like 2,4,6")
    r.add_argument("--out", required=True, help="the grid's PNG file")
    r.set_defaults(func=cmd_grid)
