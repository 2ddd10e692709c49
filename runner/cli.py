"""`loracord train` and `loracord selftest`: the runner used directly from a shell."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .spec import (
    DoneEvent,
    EpochEvent,
    FailedEvent,
    ProgressEvent,
    SpecError,
    StageEvent,
    TrainSpec,
    load_toml_settings,
)


def parse_value(text: str) -> Any:
    """A `--set` value: JSON when it parses (numbers, true/false, lists), kohya-style
    comma lists (`1,1,0.5`), otherwise the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    if "," in text:
        parts = [parse_value(p.strip()) for p in text.split(",")]
        if all(isinstance(p, int | float) for p in parts):
            return parts
    return text


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = load_toml_settings(args.config) if args.config else {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SpecError(f"--set needs key=value, got '{item}'")
        settings[key.strip()] = parse_value(value.strip())
    settings.update(train_data_dir=args.data, base=args.base, output_name=args.name, output_dir=args.out)
    if args.trigger:
        settings["trigger_word"] = args.trigger
    if args.preset:
        settings["preset"] = args.preset
    if args.resume:
        settings["resume"] = True
    return settings


class ProgressPrinter:
    """Events for people: a progress bar, a line per saved epoch."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self.bar = None

    def __call__(self, event: Any) -> None:
        if isinstance(event, ProgressEvent):
            if self.bar is None:
                self.bar = self._tqdm(total=event.total_steps, unit="step", file=sys.stderr)
            self.bar.n = event.step
            self.bar.set_postfix(
                epoch=event.epoch, loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", refresh=False
            )
            self.bar.refresh()
        elif isinstance(event, StageEvent):
            self._write(f"[{event.stage}] {event.message}")
        elif isinstance(event, EpochEvent):
            self._write(f"epoch {event.epoch}: {event.lora_file}")
            for image in event.sample_images:
                self._write(f"  sample: {image}")
        elif isinstance(event, DoneEvent):
            self._close()
            print(f"done in {event.seconds:.1f}s: {event.lora_file}")
        elif isinstance(event, FailedEvent):
            self._close()

    def _write(self, text: str) -> None:
        (self.bar.write if self.bar else print)(text, file=sys.stderr)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_train(args: argparse.Namespace) -> int:
    try:
        spec = TrainSpec.parse(settings_from_args(args))
    except (SpecError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .train import train

    emit = (lambda e: print(e.model_dump_json(), flush=True)) if args.json else ProgressPrinter()
    result = train(spec, emit)
    if isinstance(result, FailedEvent):
        print(f"error: {result.reason}", file=sys.stderr)
        return 1
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    from .selftest import selftest

    return selftest(family=args.family)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loracord")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        help="train a LoRA",
        description=(
            "Train a LoRA on a kohya-style folder (subfolders N_name repeat N times; captions in .txt files). "
            "Every kohya setting is available by its name with --set, e.g. --set network_dim=8 --set lr_scheduler=cosine."
        ),
    )
    t.add_argument("data", help="training images: a folder (kohya layout N_name/ or images directly)")
    t.add_argument(
        "--base",
        required=True,
        help="tiny:sd15, tiny:sdxl, random:sd15, random:sdxl, a .safetensors file or a diffusers folder",
    )
    t.add_argument(
        "--name", required=True, help="LoRA name: files are NAME-000001.safetensors … NAME.safetensors"
    )
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--trigger", help="trigger word, put first in every caption")
    t.add_argument(
        "--preset", choices=["character", "style", "concept"], help="starting settings for the base's family"
    )
    t.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="any setting by its kohya name (repeatable)"
    )
    t.add_argument("--config", help="a TOML file of settings (kohya names); --set wins over it")
    t.add_argument("--resume", action="store_true", help="continue from the last saved epoch in --out")
    t.add_argument("--json", action="store_true", help="print events as JSON lines instead of a progress bar")
    t.set_defaults(func=cmd_train)
    s = sub.add_parser("selftest", help="train a tiny LoRA on the CPU and check the result")
    s.add_argument("--family", choices=["sd15", "sdxl"], default="sd15")
    s.set_defaults(func=cmd_selftest)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
