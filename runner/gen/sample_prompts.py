"""Kohya's sample-prompt lines, read without torch: the trainer renders them, and the bot prices
the preview rounds they ask for before a job is queued."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..spec import SamplePromptSettings

MAX_SIDE = 4096
DEFAULT_NEGATIVE = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality, jpeg artifacts, signature, watermark, blurry"
)


# ---- prompts ----


@dataclass
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None  # None: a fresh random seed each time
    cfg_scale: float = 7.5
    steps: int = 30
    sampler: str | None = None  # None: DEFAULT_SAMPLER
    guidance: float = 3.5  # Flux dev's distilled guidance (kohya's --g); SD ignores it

    def seeded(self) -> SamplePrompt:
        """This prompt with its seed fixed, drawing one if unset, so it can be rendered and recorded."""
        return self if self.seed is not None else replace(self, seed=random.randrange(2**32))


def _number(option: str, value: str, cast: type[int] | type[float]) -> Any:
    try:
        number = cast(value)
    except ValueError:
        raise ValueError(f"--{option} needs a number, got '{value}'") from None
    if number < 0:
        raise ValueError(f"--{option} cannot be negative, got {value}")
    return number


def _side(option: str, value: str) -> int:
    side = _number(option, value, int)
    if side > MAX_SIDE:
        raise ValueError(f"--{option} must be at most {MAX_SIDE}, got {side}")
    return max(64, side - side % 8)  # kohya rounds down to a multiple of 8, at least 64


def parse_sample_prompt(
    line: str,
    *,
    width: int,
    height: int,
    steps: int,
    sampler: str,
    seed: int,
    cfg_scale: float = 7.5,
    resolve_sampler: Callable[[str], str] = str.strip,
) -> SamplePrompt:
    """One line of kohya's sample-prompt syntax; the keyword arguments fill the options it leaves out.

    Options follow the prompt, each after `` --``: ``--n`` negative prompt, ``--w``/``--h`` size
    (rounded down to a multiple of 8), ``--d`` seed, ``--l`` CFG scale, ``--g`` Flux guidance,
    ``--s`` steps (clamped to 1-1000 as kohya does), ``--ss`` sampler. Option letters are
    case-insensitive. Anything else raises ValueError with a message meant for the member who wrote
    the line. ``resolve_sampler`` turns a sampler's name into its key (``runner.gen.generate``'s, which
    knows the samplers); without it the name is kept as written.
    """
    # The leading space lets a line of options alone (``--n lowres``) read as an empty prompt.
    prompt, *options = f" {line.strip()}".split(" --")
    sp = SamplePrompt(
        prompt.strip(),
        width=_side("w", str(width)),
        height=_side("h", str(height)),
        seed=seed,
        steps=steps,
        sampler=resolve_sampler(sampler),
        cfg_scale=cfg_scale,
    )
    try:
        for option in options:
            key, _, value = option.strip().partition(" ")
            key, value = key.lower(), value.strip()
            if key == "n":
                sp.negative = value
            elif key == "w":
                sp.width = _side(key, value)
            elif key == "h":
                sp.height = _side(key, value)
            elif key == "d":
                sp.seed = _number(key, value, int)
            elif key == "l":
                sp.cfg_scale = _number(key, value, float)
            elif key == "g":
                sp.guidance = _number(key, value, float)
            elif key == "s":
                sp.steps = max(1, min(1000, _number(key, value, int)))
            elif key == "ss":
                sp.sampler = resolve_sampler(value)
            elif key:
                raise ValueError(f"unknown option --{key} (use --n, --w, --h, --d, --l, --g, --s, --ss)")
    except ValueError as e:
        raise ValueError(f"sample prompt '{line.strip()}': {e}") from None
    return sp


def sample_prompt_from_table(
    table: SamplePromptSettings,
    *,
    width: int,
    height: int,
    steps: int,
    sampler: str,
    seed: int,
    cfg_scale: float = 7.5,
    resolve_sampler: Callable[[str], str] = str.strip,
) -> SamplePrompt:
    """One prompt table of a kohya .toml/.json prompt file; the keyword arguments fill the keys it
    leaves out, as they fill a prompt line's missing options. The prompt text is taken as it is
    (kohya reads no ``--`` options inside a table's prompt)."""
    sp = SamplePrompt(
        table.prompt.strip(),
        negative=table.negative_prompt,
        width=_side("w", str(width if table.width is None else table.width)),
        height=_side("h", str(height if table.height is None else table.height)),
        seed=seed if table.seed is None else table.seed,
        cfg_scale=cfg_scale if table.scale is None else table.scale,
        steps=table.sample_steps or steps,
        sampler=resolve_sampler(table.sample_sampler or sampler),
    )
    return sp if table.guidance_scale is None else replace(sp, guidance=table.guidance_scale)


def read_sample_prompt(entry: str | SamplePromptSettings, **defaults: Any) -> SamplePrompt:
    """A sample_prompts entry: a kohya prompt line, or a table of a kohya prompt file."""
    if isinstance(entry, str):
        return parse_sample_prompt(entry, **defaults)
    return sample_prompt_from_table(entry, **defaults)


_UNESCAPED_PAREN = re.compile(r"(?<!\\)([()])")


def default_sample_prompts(trigger: str | None, common_tags: Sequence[str], n: int = 2) -> list[str]:
    """``n`` kohya-syntax prompt lines for a dataset: the trigger word first, then its common tags.

    The first shows the trigger with the most common tags, the second the trigger alone (does the
    word carry the concept?), further ones the trigger with the next few tags in turn. Tags are
    escaped so that parentheses in tag names are not read as emphasis.
    """
    trigger = (trigger or "").strip()
    tags = [
        _UNESCAPED_PAREN.sub(r"\\\1", t.strip()) for t in common_tags if t.strip() and t.strip() != trigger
    ]
    lead = [trigger] if trigger else []
    bodies = [lead + tags[:8], lead or tags[:2]]
    for i in range(2, n):
        start = 8 + 4 * (i - 2)
        bodies.append(lead + (tags[start : start + 4] or tags[:4]))
    return [f"{', '.join(body)} --n {DEFAULT_NEGATIVE}" for body in bodies[:n]]
