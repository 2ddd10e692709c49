"""`loracord train`, `dataset`, `tag`, `caption` and `selftest`: the runner used directly from a shell."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .gen_cli import add_gen_commands
from .spec import (
    CaptionSpec,
    DoneEvent,
    EpochEvent,
    FailedEvent,
    IntakeSpec,
    ProgressEvent,
    SamplesEvent,
    SpecError,
    StageEvent,
    TagSpec,
    TrainSpec,
    layer_settings,
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


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    settings = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SpecError(f"--set needs key=value, got '{item}'")
        settings[key.strip()] = parse_value(value.strip())
    return settings


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    # --set is laid over the file: a max_train_steps given there replaces the file's epochs.
    settings = layer_settings(load_toml_settings(args.config) if args.config else {}, parse_sets(args.set))
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
        elif isinstance(event, SamplesEvent):
            self._write(
                f"previews at {'epoch ' if event.end_of_epoch else 'step '}"
                f"{event.epoch if event.end_of_epoch else event.step} (not saved)"
            )
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


def _emitter(args: argparse.Namespace) -> Any:
    """Events as JSON lines with --json, else a progress bar for a person."""
    return (lambda e: print(e.model_dump_json(), flush=True)) if args.json else ProgressPrinter()


def cmd_train(args: argparse.Namespace) -> int:
    try:
        spec = TrainSpec.parse(settings_from_args(args))
    except (SpecError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .train.loop import train

    result = train(spec, _emitter(args))
    if isinstance(result, FailedEvent):
        print(f"error: {result.reason}", file=sys.stderr)
        return 1
    return 0


def _given(args: argparse.Namespace, names: dict[str, str]) -> dict[str, Any]:
    """Spec fields from the options a member actually gave (argparse name → spec name)."""
    return {field: getattr(args, arg) for arg, field in names.items() if getattr(args, arg) is not None}


def cmd_dataset(args: argparse.Namespace) -> int:
    try:
        settings = parse_sets(args.set)
        settings.update(sources=args.sources, output_dir=args.out)
        settings.update(
            _given(args, {"repeats": "num_repeats", "name": "name", "caption_extension": "caption_extension"})
        )
        spec = IntakeSpec.parse(settings)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .data.intake import build_dataset

    report = build_dataset(spec)
    if args.json:
        print(report.model_dump_json())
    else:
        print("\n".join(report.lines()))
        for sheet in report.contact_sheets:
            print(f"contact sheet: {sheet}")
        print(f"report: {report.report_file}")
    return 0 if report.accepted else 1


def _tag_list(values: list[str] | None) -> list[str]:
    return [t.strip() for v in values or [] for t in v.split(",") if t.strip()]


def _caption_job(
    args: argparse.Namespace, spec_type: Any, names: dict[str, str], extra: dict[str, Any]
) -> Any:
    """Parse a tag or caption job's settings (``--set`` first, named options over them); SpecError
    says what is wrong."""
    settings = parse_sets(args.set)
    settings["train_data_dir"] = args.data
    settings.update(_given(args, names))
    settings.update(extra)
    return spec_type.parse(settings)


def _report_captions(args: argparse.Namespace, result: Any, examples: bool) -> int:
    """What a tag or caption job did, for a person (or nothing more with --json); the exit code."""
    if isinstance(result, FailedEvent):
        print(f"error: {result.reason}", file=sys.stderr)
        return 1
    if not args.json:
        print(f"{result.images} images captioned, {result.captions_written} caption files written")
        for file, why in result.skipped:
            print(f"skipped {file}: {why}")
        for file, caption in result.examples if examples else ():
            print(f"{file}: {caption}")
        for row in result.tag_summary[:40]:
            print(f"{row.count:5d}  {row.share:6.0%}  {row.tag}")
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    names = {
        "tagger": "tagger",
        "threshold": "general_threshold",
        "character_threshold": "character_threshold",
        "trigger": "trigger_word",
        "mode": "mode",
        "preset": "preset",
        "caption_extension": "caption_extension",
    }
    lists = {k: _tag_list(v) for k, v in (("remove", args.remove), ("add", args.add)) if v}
    try:
        spec = _caption_job(args, TagSpec, names, lists)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .data.tagger import tag_dataset

    result = tag_dataset(spec, _emitter(args))
    code = _report_captions(args, result, examples=False)
    if code == 0 and not args.json and result.suggested_removals:
        tags = ",".join(result.suggested_removals)
        print(
            f"on most images and about the subject; remove them to bake them into the trigger word:\n  --remove '{tags}'"
        )
    return code


def cmd_caption(args: argparse.Namespace) -> int:
    names = {
        "captioner": "captioner",
        "task": "task",
        "trigger": "trigger_word",
        "trigger_style": "trigger_style",
        "prefix": "prefix",
        "mode": "mode",
        "max_words": "max_words",
        "batch_size": "batch_size",
        "cache_dir": "cache_dir",
        "caption_extension": "caption_extension",
    }
    try:
        spec = _caption_job(args, CaptionSpec, names, {})
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .data.captioner import caption_dataset

    return _report_captions(args, caption_dataset(spec, _emitter(args)), examples=True)


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
        help="tiny:sd15, tiny:sdxl, tiny:flux, random:sd15, random:sdxl, random:flux, a .safetensors "
        "file (Flux: the transformer, with $LORACORD_FLUX_COMPONENTS) or a diffusers folder",
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
    d = sub.add_parser(
        "dataset",
        help="turn images, folders and zips into a clean training folder",
        description=(
            "Check, convert and number images from files, folders and zips into OUT/N_NAME/ (captions beside "
            "them kept), report what was accepted, converted or refused and why, flag near-duplicates and "
            "small images, and draw a numbered contact sheet. Limits with --set, e.g. --set max_images=100."
        ),
    )
    d.add_argument("sources", nargs="+", help="image files, folders and .zip files")
    d.add_argument("--out", required=True, help="the dataset folder to write (loracord train DIR reads it)")
    d.add_argument("--repeats", type=int, help="N in N_NAME: repeats per epoch (default 10)")
    d.add_argument("--name", help="NAME in N_NAME (default: the --out folder's name)")
    d.add_argument("--caption-extension", help="caption files' extension (default .txt)")
    d.add_argument("--set", action="append", metavar="KEY=VALUE", help="any intake setting (repeatable)")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.set_defaults(func=cmd_dataset)
    g = sub.add_parser(
        "tag",
        help="caption a dataset folder with a WD14 tagger",
        description="Auto-tag every image under DIR (subfolders included) and write its caption file.",
    )
    g.add_argument("data", help="a dataset folder, as loracord dataset writes it")
    g.add_argument(
        "--tagger", help="a SmilingWolf tagger name (default wd-swinv2-tagger-v3), a repo id, or a folder"
    )
    g.add_argument("--threshold", type=float, help="general tags' threshold (default 0.35)")
    g.add_argument("--character-threshold", type=float, help="character tags' threshold (default 0.85)")
    g.add_argument("--trigger", help="trigger word, written first in every caption")
    g.add_argument("--remove", action="append", metavar="TAGS", help="comma-separated tags to leave out")
    g.add_argument(
        "--add", action="append", metavar="TAGS", help="comma-separated tags to put after the trigger"
    )
    g.add_argument(
        "--mode",
        choices=["keep", "replace", "merge"],
        help="existing captions: keep (default), replace or merge",
    )
    g.add_argument(
        "--preset", choices=["character", "style", "concept"], help="what the LoRA is for (suggestions)"
    )
    g.add_argument("--caption-extension", help="caption files' extension (default .txt)")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help="any tag setting (repeatable)")
    g.add_argument("--json", action="store_true", help="print events as JSON lines")
    g.set_defaults(func=cmd_tag)
    c = sub.add_parser(
        "caption",
        help="caption a dataset folder in sentences with Florence-2",
        description="Caption every image under DIR (subfolders included) with Florence-2 and write its "
        "caption file: the model's opening ('The image shows') removed, the trigger word first.",
    )
    c.add_argument("data", help="a dataset folder, as loracord dataset writes it")
    c.add_argument(
        "--captioner",
        help="florence2-large (default; downloaded once), florence2-base, or a folder with a Florence-2 model",
    )
    c.add_argument("--task", help="caption, detailed (default) or more_detailed")
    c.add_argument("--trigger", help="trigger word, written first in every caption")
    c.add_argument(
        "--trigger-style",
        choices=["subject", "photo_of"],
        help="'zzk, a woman …' (subject, default) or 'a photo of zzk, a woman …'",
    )
    c.add_argument("--prefix", help="text after the trigger, before the caption (e.g. 'anime style')")
    c.add_argument(
        "--mode",
        choices=["replace", "append", "prepend", "keep"],
        help="existing captions: replace (default), append or prepend the new one, or keep them",
    )
    c.add_argument("--max-words", type=int, help="cut each caption to this many words at a sentence end")
    c.add_argument("--batch-size", type=int, help="images per batch on the GPU (default 8)")
    c.add_argument("--cache-dir", help="where a downloaded captioner is kept")
    c.add_argument("--caption-extension", help="caption files' extension (default .txt)")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="any caption setting (repeatable)")
    c.add_argument("--json", action="store_true", help="print events as JSON lines")
    c.set_defaults(func=cmd_caption)
    add_gen_commands(sub)
    s = sub.add_parser("selftest", help="train a tiny LoRA on the CPU and check the result")
    s.add_argument("--family", choices=["sd15", "sdxl"], default="sd15", help="the tiny model to train")
    s.set_defaults(func=cmd_selftest)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
