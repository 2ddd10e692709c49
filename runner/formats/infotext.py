"""A1111's prompt conventions as text: ``<lora:name:weight>`` tags and the ``parameters`` infotext.

Torch-free, so the bot can read an image's parameters back (``/gen`` re-roll) without loading a
model. The formats are A1111's (``modules/infotext_utils.py`` and the Lora extension); no package
on PyPI parses them, so they are restated here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

# <lora:name> or <lora:name:weight>; A1111's extra-network syntax is <kind:arg:arg…>.
_LORA_TAG = re.compile(r"<lora:([^>]*)>", re.IGNORECASE)
# A1111's regex for one "Key: value" of the last line; values with , : or newlines are JSON-quoted.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


@dataclass(frozen=True)
class LoraTag:
    name: str
    weight: float


def split_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt without its ``<lora:…>`` tags (as A1111 encodes it), and the tags in order.

    ``<lora:name>`` means weight 1; weights may be negative. A1111's separate text-encoder/UNet
    weights (``<lora:name:0.8:0.5>``) are refused rather than silently applied as one.
    """
    tags: list[LoraTag] = []
    for m in _LORA_TAG.finditer(prompt):
        name, *weights = (part.strip() for part in m.group(1).split(":"))
        if not name:
            raise ValueError(f"'{m.group(0)}' has no LoRA name: write <lora:NAME:0.8>")
        if len(weights) > 1:
            raise ValueError(f"'{m.group(0)}': only one weight is supported, as in <lora:{name}:0.8>")
        try:
            weight = float(weights[0]) if weights and weights[0] else 1.0
        except ValueError:
            raise ValueError(
                f"'{m.group(0)}': the weight must be a number, as in <lora:{name}:0.8>"
            ) from None
        tags.append(LoraTag(name, weight))
    return _LORA_TAG.sub("", prompt), tags


def lora_tag(name: str, weight: float) -> str:
    return f"<lora:{name}:{weight:g}>"


def _quote(value: Any) -> str:
    # A1111's quoting rule for infotext values, so that its parser splits the line back correctly.
    text = str(value)
    if any(c in text for c in ",\n:"):
        return json.dumps(text, ensure_ascii=False)
    return text


def format_parameters(prompt: str, negative: str, fields: dict[str, Any]) -> str:
    """A1111's ``parameters`` text: the prompt, ``Negative prompt: …`` if any, then one line of
    ``Key: value`` pairs in the order given; fields whose value is None are left out."""
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None)
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{negative_line}\n{line}"


@dataclass
class Infotext:
    prompt: str
    negative_prompt: str = ""
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def sampler(self) -> str | None:
        """The sampler in the older one-name form (``DPM++ 2M Karras``), from either way A1111 writes it."""
        name, schedule = self.fields.get("Sampler"), self.fields.get("Schedule type")
        if name is None or schedule in (None, "Automatic", "Uniform") or name.endswith(f" {schedule}"):
            return name
        return f"{name} {schedule}"

    def gen_settings(self) -> dict[str, Any]:
        """The GenSpec settings that reproduce the image (base, output and LoRA folder are the caller's)."""
        f = self.fields
        settings: dict[str, Any] = {"prompt": self.prompt, "negative_prompt": self.negative_prompt}
        if "Size" in f:
            width, _, height = f["Size"].partition("x")
            settings.update(width=int(width), height=int(height))
        for key, name, cast in (
            ("Steps", "steps", int),
            ("CFG scale", "cfg_scale", float),
            ("Seed", "seed", int),
            ("Clip skip", "clip_skip", int),
            ("Distilled CFG Scale", "guidance_scale", float),  # Forge's name for Flux guidance
        ):
            if key in f:
                settings[name] = cast(f[key])
        if self.sampler:
            settings["sampler"] = self.sampler
        return settings


def parse_parameters(text: str) -> Infotext:
    """Read A1111's ``parameters`` text back, as A1111's own ``parse_generation_parameters`` does."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:  # A1111's test for "this is the settings line"
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            negative.append(line[len("Negative prompt:") :].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    fields = {}
    for key, value in _PARAM.findall(last):
        if len(value) > 1 and value[0] == value[-1] == '"':
            value = json.loads(value)
        fields[key] = value
    return Infotext("\n".join(prompt), "\n".join(negative), fields)
