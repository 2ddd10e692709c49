"""The contract between the bot and the GPU side: specs in, events out, all plain JSON.

Every training setting carries kohya sd-scripts' name so that members (and their saved
configs) can use the words they already know. Validation happens here, once: a spec that
parses is a spec the runner can train.
"""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

LrScheduler = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
]
OptimizerType = Literal["AdamW", "AdamW8bit", "Adafactor", "Lion", "DAdaptation", "DAdaptAdam", "Prodigy"]
Precision = Literal["no", "fp16", "bf16"]
SavePrecision = Literal["float", "fp16", "bf16"]
SampleSampler = Literal["euler_a", "euler", "ddim", "dpmsolver++", "lms", "heun", "pndm", "unipc"]
# A1111's sampler names (the older "… Karras" spelling, which recent A1111 splits into "Schedule type").
GenSampler = Literal[
    "Euler a",
    "Euler",
    "DPM++ 2M",
    "DPM++ 2M Karras",
    "DPM++ SDE Karras",
    "DDIM",
    "UniPC",
    "LMS",
    "Heun",
    "PLMS",
]
BlockWeights = (
    list[Annotated[float, Field(ge=0.0, le=10.0)]]
    | Literal["sine", "cosine", "linear", "reverse_linear", "zeros"]
)


def _plain_value(text: str) -> Any:
    """A number, a bool, a comma list of numbers, or the text: how kohya reads optimizer_args."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) if any(c in p for c in ".eE") else int(p) for p in parts]
    except ValueError:
        return {"true": True, "false": False}.get(text.lower(), text)
    return values if len(values) > 1 else values[0]


class SpecError(ValueError):
    """A spec that cannot be run; the message is meant for the member who wrote it."""


def _describe_error(err: dict[str, Any], fields: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "spec"
    got = err.get("input")
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(err["loc"][-1]), list(fields), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        return f"unknown setting '{loc}'{hint}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        field = fields.get(str(err["loc"][0]))
        lo, hi = _bounds(field)
        # Nested settings (loras.0.weight) are not top-level fields; pydantic's own words then.
        rng = (
            f"between {lo} and {hi}"
            if lo is not None and hi is not None
            else err["msg"].lower().removeprefix("input should be ")
        )
        return f"{loc} must be {rng} (got {got!r})"
    if kind == "literal_error":
        return f"{loc} must be one of {ctx.get('expected')} (got {got!r})"
    if kind == "value_error":  # our own validators' messages, without pydantic's "Value error, "
        message = str(ctx.get("error", err["msg"]))
        if not err["loc"]:  # a rule between settings: the message names them
            return message
        return f"{loc}: {message}" if "(got" in message else f"{loc}: {message} (got {got!r})"
    return f"{loc}: {err['msg']} (got {got!r})"


def _bounds(field: Any) -> tuple[Any, Any]:
    lo = hi = None
    for m in getattr(field, "metadata", []) or []:
        lo = getattr(m, "ge", None) if getattr(m, "ge", None) is not None else lo
        lo = getattr(m, "gt", None) if getattr(m, "gt", None) is not None else lo
        hi = getattr(m, "le", None) if getattr(m, "le", None) is not None else hi
        hi = getattr(m, "lt", None) if getattr(m, "lt", None) is not None else hi
    return lo, hi


FILE_NAME_BYTES = 255  # the longest file name ext4, btrfs, XFS and APFS take, counted in bytes


def epoch_file(name: str, epoch: int) -> str:
    return f"{name}-{epoch:06d}.safetensors"


def sample_file(name: str, epoch: int, index: int, step: int | None = None) -> str:
    """A preview's file: by epoch, or by optimizer step for previews taken within an epoch."""
    return (
        f"{name}-step{step:06d}-{index:02d}.png"
        if step is not None
        else f"{name}-{epoch:06d}-{index:02d}.png"
    )


def state_folder(name: str, suffix: str = "") -> str:
    """The saved training state (``suffix`` ".tmp"/".old": its siblings while it is replaced)."""
    return f".{name}-state{suffix}" if suffix else f"{name}-state"


# Every name the trainer makes from output_name, at its longest, so a name that passes here fits
# in every one of them: an epoch has at least one step, so its number is at most max_train_steps'
# 1_000_000; sample indices stay below 10000.
OUTPUT_NAME_BYTES = FILE_NAME_BYTES - max(
    len(made.encode())
    for made in (
        epoch_file("", 1_000_000),
        sample_file("", 1_000_000, 9999),
        sample_file("", 0, 9999, step=1_000_000),
        state_folder("", ".tmp"),
        state_folder("", ".old"),
        ".safetensors",
    )
)


def _file_name(v: str) -> str:
    # Any Unicode is fine (Japanese, emoji); only what breaks a file name is refused.
    bad = set('/\\:*?"<>|\0') & set(v)
    if bad or v.strip(" .") != v:
        raise ValueError(f"cannot contain {''.join(sorted(bad)) or 'leading/trailing dots or spaces'}")
    return v


def _dotted(v: str) -> str:
    return v if v.startswith(".") else "." + v


CaptionExtension = Annotated[str, AfterValidator(_dotted)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def parse(cls, data: dict[str, Any]):
        """Validate ``data``; raise SpecError with one readable line per problem."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            lines = [_describe_error(err, cls.model_fields) for err in e.errors()]
            raise SpecError("; ".join(lines)) from None

    def to_json(self) -> str:
        # Only what was set travels: a preset fills the rest on the GPU side, and must not be
        # overridden by defaults that nobody chose.
        return self.model_dump_json(exclude_unset=True)


class RunLength(NamedTuple):
    epochs: int
    steps: int
    steps_per_epoch: int


RUN_LENGTH = ("max_train_epochs", "max_train_steps")


def layer_settings(under: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``under``, the run length counting as one setting: when ``over`` gives
    epochs or steps, ``under``'s epochs and steps both go. So a member's max_train_steps is not
    beaten by a preset's (or an older setting's) max_train_epochs, which kohya would let win."""
    merged = {**under, **over}
    if any(k in over for k in RUN_LENGTH):
        for k in RUN_LENGTH:
            if k not in over:
                merged.pop(k, None)
    return merged


PROMPT_FILE_SUFFIXES = (".txt", ".toml", ".json")


def names_prompt_file(value: Any) -> bool:
    """Whether a sample_prompts value is a path to a prompt file (kohya tells them by the suffix)."""
    return (
        isinstance(value, str) and "\n" not in value and value.strip().lower().endswith(PROMPT_FILE_SUFFIXES)
    )


class SamplePromptSettings(_Spec):
    """One prompt of a kohya .toml/.json prompt file, with kohya's keys; unset keys take the
    sample_* settings and the training resolution, as a prompt line's missing options do."""

    prompt: str = ""
    negative_prompt: str = ""
    width: int | None = Field(None, ge=64, le=4096, description="rounded down to a multiple of 8")
    height: int | None = Field(None, ge=64, le=4096, description="rounded down to a multiple of 8")
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    scale: float | None = Field(None, ge=0.0, le=100.0, description="CFG scale")
    sample_steps: int | None = Field(None, ge=1, le=1000)
    sample_sampler: str | None = None
    guidance_scale: float | None = Field(None, ge=0.0, le=30.0, description="Flux guidance")


def read_prompt_file(path: str) -> list[str | dict[str, Any]]:
    """A kohya sample-prompt file, as kohya's train_util reads it: .txt lines (blank lines and
    lines starting with # left out), a .toml ``[prompt]`` table whose keys are defaults for each
    ``[[prompt.subset]]``, or a .json list of prompt lines or tables."""
    file = Path(path.strip()).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(
            f"cannot read the prompt file {path.strip()}: {getattr(e, 'strerror', None) or e}"
        ) from None
    prompts = _prompt_file_entries(file, text)
    if not prompts:
        raise ValueError(f"the prompt file {file.name} has no prompts")
    return prompts


def _prompt_file_entries(file: Path, text: str) -> list[str | dict[str, Any]]:
    import tomllib

    suffix = file.suffix.lower()
    if suffix == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    try:
        data = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the prompt file {file.name} does not parse: {e}") from None
    if suffix == ".toml":
        table = data.get("prompt")
        if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
            raise ValueError(
                f"the prompt file {file.name} needs a [prompt] table of defaults and [[prompt.subset]] prompts"
            )
        defaults = {k: v for k, v in table.items() if k != "subset"}
        return [{**defaults, **subset} for subset in table["subset"]]
    if not isinstance(data, list):
        raise ValueError(f"the prompt file {file.name} must hold a JSON list of prompts")
    return data


# Settings that change how fast a run goes, never what it trains: a run may resume with them changed.
SPEED_SETTINGS = (
    "loss_one_step_late",
    "channels_last",
    "torch_compile",
    "torch_compile_backend",
    "torch_compile_dynamic",
)


class TrainSpec(_Spec):
    # What and where.
    output_name: str = Field(
        min_length=1,
        max_length=120,
        description="the LoRA's name and its files' (NAME-000001.safetensors): at most OUTPUT_NAME_BYTES "
        "bytes in UTF-8, so every file name training writes fits 255 bytes",
    )
    base: str = Field(
        min_length=1, description="tiny:sd15, random:sdxl, a .safetensors file or a diffusers folder"
    )
    train_data_dir: str
    output_dir: str
    trigger_word: str | None = None
    preset: Literal["character", "style", "concept"] | None = Field(
        None, description="defaults for the base's family; settings given explicitly win"
    )
    training_comment: str | None = None
    resume: bool = False

    # Dataset.
    # None = derived from the base model's native size when training starts (see train.concrete_spec).
    resolution: tuple[int, int] | None = None
    enable_bucket: bool = True
    min_bucket_reso: int | None = Field(None, ge=32, le=4096)
    max_bucket_reso: int | None = Field(None, ge=32, le=4096)
    bucket_reso_steps: int | None = Field(None, ge=8, le=512)
    bucket_no_upscale: bool = False
    num_repeats: int = Field(1, ge=1, le=1000, description="repeats for folders without an N_ prefix")
    caption_extension: str = ".txt"
    caption_separator: str = ","
    shuffle_caption: bool = False
    keep_tokens: int = Field(0, ge=0, le=100)
    caption_dropout_rate: float = Field(0.0, ge=0.0, le=1.0)
    caption_dropout_every_n_epochs: int = Field(0, ge=0, le=1000)
    caption_tag_dropout_rate: float = Field(0.0, ge=0.0, le=1.0)
    max_token_length: Literal[75, 150, 225] = Field(
        75,
        description="caption tokens kept; 150/225 encode 2/3 chunks of 75 and join them as kohya does "
        "(75n + 2 tokens: one BOS, each chunk's 75, one end token)",
    )
    weighted_captions: bool = Field(
        False,
        description="(tag:1.2) syntax: each token's output times its weight, the caption's mean restored",
    )
    flip_aug: bool = False

    # Network.
    network_dim: int = Field(16, ge=1, le=1024)
    network_alpha: float = Field(8.0, gt=0.0, le=1024.0)
    conv_dim: int | None = Field(None, ge=1, le=1024)
    conv_alpha: float | None = Field(None, gt=0.0, le=1024.0)
    down_lr_weight: BlockWeights | None = None
    mid_lr_weight: Annotated[float, Field(ge=0.0, le=10.0)] | None = None
    up_lr_weight: BlockWeights | None = None
    network_train_unet_only: bool = False
    network_train_text_encoder_only: bool = False

    # Optimisation.
    learning_rate: float = Field(1e-4, gt=0.0, le=10.0)
    unet_lr: float | None = Field(None, ge=0.0, le=10.0)
    text_encoder_lr: float | None = Field(None, ge=0.0, le=10.0)
    lr_scheduler: LrScheduler = Field(
        "cosine",
        description="diffusers' schedule of that name; constant with a warmup becomes constant_with_warmup "
        "(diffusers' constant ignores warmup) and the metadata names the schedule used",
    )
    lr_warmup_steps: float = Field(
        0,
        ge=0,
        le=100000,
        description="optimizer steps of linear warmup from 0, or a fraction of all steps when < 1 "
        "(rounded down, as kohya does)",
    )
    lr_scheduler_num_cycles: int = Field(1, ge=1, le=100)
    lr_scheduler_power: float = Field(1.0, gt=0.0, le=10.0)
    optimizer_type: OptimizerType = Field(
        "AdamW",
        description="kohya's optimizer names, each the class kohya uses (DAdaptation is dadaptation's "
        "DAdaptAdamPreprint). Adafactor trains at the set learning rates (relative_step, scale_parameter "
        "and warmup_init off); optimizer_args relative_step=True or warmup_init=True switch to Adafactor's "
        "own step size and ignore the learning rates, as kohya's default Adafactor does",
    )
    optimizer_args: dict[str, float | int | bool | str | list[float]] = Field(default_factory=dict)
    max_grad_norm: float = Field(1.0, ge=0.0, le=1000.0)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)

    # Noise and loss.
    min_snr_gamma: float | None = Field(
        None,
        gt=0.0,
        le=100.0,
        description="loss × min(SNR, gamma) / SNR (v-prediction: / (SNR + 1)), as kohya's apply_snr_weight",
    )
    noise_offset: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="adds noise_offset × one normal draw per image and latent channel to the noise",
    )
    multires_noise_iterations: int | None = Field(
        None,
        ge=1,
        le=20,
        description="kohya's pyramid noise: this many octaves (the first full-size) added after the offset",
    )
    multires_noise_discount: float = Field(0.3, gt=0.0, le=1.0, description="octave i weighs discount^i")
    clip_skip: int | None = Field(None, ge=1, le=12)
    seed: int = Field(42, ge=0, le=2**32 - 1)

    # Precision and speed.
    mixed_precision: Precision = "no"
    save_precision: SavePrecision = "fp16"
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass (UNet and trained text encoders)"
    )
    cache_latents: bool = Field(
        True,
        description="one sample of each image's latents for the whole run; false: a fresh sample every step",
    )
    cache_text_encoder_outputs: bool = Field(
        True,
        description="encode each caption once, not every step; settings that change captions between "
        "steps or train a text encoder undo it (see runner.families.registry.text_encoding)",
    )
    # Speed only: none changes what is trained (tests/test_speed_settings.py), so none is part of the
    # resume check. Off by default until the GPU benchmark (docs/benchmarks.md) says they pay.
    loss_one_step_late: bool = Field(
        False,
        description="read each step's loss after the next step is queued, so the host never waits for the "
        "GPU mid-run; progress and NaN/inf failures still name the step the loss belongs to",
    )
    channels_last: bool = Field(
        False, description="the UNet's weights and activations in NHWC (UNet bases; faster convolutions)"
    )
    torch_compile: bool = Field(
        False,
        description="torch.compile the UNet/transformer; every batch shape is compiled before the first "
        "step (reported as the 'compile' stage), so training itself never recompiles",
    )
    torch_compile_backend: Literal["inductor", "aot_eager", "eager"] = Field(
        "inductor",
        description="torch.compile's backend: inductor (the fast one); aot_eager and eager only trace "
        "(checks and CPU tests)",
    )
    torch_compile_dynamic: bool = Field(
        False,
        description="one graph with dynamic batch and sizes for every bucket; false: one graph per batch shape",
    )

    # Flux only (kohya's flux_train_network.py names; refused for SD bases, see runner/families/flux.py).
    guidance_scale: float = Field(
        3.5, ge=0.0, le=30.0, description="the guidance the dev model is told while training"
    )
    timestep_sampling: Literal["sigma", "uniform", "sigmoid", "shift", "flux_shift"] = "sigma"
    sigmoid_scale: float = Field(1.0, gt=0.0, le=100.0)
    discrete_flow_shift: float = Field(3.0, gt=0.0, le=100.0)
    model_prediction_type: Literal["raw", "additive", "sigma_scaled"] = Field(
        "sigma_scaled",
        description="kohya's: how the transformer's output is compared with the velocity noise - x_0: "
        "raw as it is, additive plus the noisy latents, sigma_scaled times -σ plus the noisy latents "
        "(kohya's default)",
    )
    t5xxl_max_token_length: int | None = Field(
        None, ge=8, le=512, description="T5 tokens; unset: 512 for dev, 256 for schnell"
    )
    fp8_base: bool = Field(
        False,
        description="store the frozen transformer in fp8 (half the memory of bf16), cast on the host "
        "before it moves to the GPU, each layer upcast as it runs; needs mixed_precision bf16 or fp16",
    )
    # Z-Image only (runner/families/zimage.py); other families refuse it.
    training_adapter: str | None = Field(
        None,
        description="Z-Image: a .safetensors LoRA (ostris' Turbo training adapter) merged into the frozen "
        "transformer for the run and taken off for previews; never part of the saved LoRA",
    )

    # Run length.
    train_batch_size: int = Field(1, ge=1, le=256)
    # As in kohya: epochs, when given, decide the run length and max_train_steps is not used.
    # A preset's epochs apply only when the member set neither (see layer_settings).
    max_train_epochs: int | None = Field(
        None, ge=1, le=10000, description="epochs to train; when given, max_train_steps is not used"
    )
    max_train_steps: int | None = Field(
        1600,
        ge=1,
        le=1_000_000,
        description="optimizer steps to train when max_train_epochs is not given (kohya's default 1600)",
    )
    save_every_n_epochs: int = Field(1, ge=1, le=10000)

    # Preview images (kohya's prompt syntax), rendered with the weights of that moment.
    sample_prompts: list[str | SamplePromptSettings] = Field(
        default_factory=list,
        description="prompt lines (--n --w --h --d --l --g --s --ss options), or one path to a kohya prompt "
        "file: .txt (a prompt line a line, # comments), .toml ([prompt] defaults, [[prompt.subset]] "
        "prompts) or .json (a list of lines or of prompt tables); unset: the trigger word and common tags",
    )
    sample_sampler: SampleSampler = "euler_a"
    sample_steps: int = Field(20, ge=1, le=1000)
    sample_every_n_epochs: int | None = Field(
        None,
        ge=0,
        le=10000,
        description="previews after every N epochs and after the last, whether saved or not; unset: "
        "save_every_n_epochs, or none when sample_every_n_steps is given; 0 = none",
    )
    sample_every_n_steps: int | None = Field(
        None, ge=0, le=1_000_000, description="previews after every N optimizer steps; unset or 0 = none"
    )
    sample_at_first: bool = Field(False, description="previews before the first step (the base model alone)")

    @field_validator("resolution", mode="before")
    @classmethod
    def _resolution(cls, v: Any) -> Any:
        # kohya accepts "512" or "512,768" (width,height).
        if isinstance(v, int):
            return (v, v)
        if isinstance(v, str):
            parts = [p.strip() for p in v.replace("x", ",").split(",") if p.strip()]
            if len(parts) == 1:
                parts = parts * 2
            if len(parts) != 2 or not all(p.isdigit() for p in parts):
                raise ValueError("write one size or width,height, e.g. 512 or 512,768")
            return tuple(int(p) for p in parts)
        return v

    @field_validator("sample_prompts", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        # kohya's sample_prompts is one file path; a string that is not one is a single prompt
        # (`--set sample_prompts="a photo of sks --w 512"`). The file is read now, so a missing one
        # is refused before training and a queued job keeps the prompts it was given.
        if isinstance(v, str):
            return read_prompt_file(v) if names_prompt_file(v) else [v]
        return v

    @field_validator("optimizer_args", mode="before")
    @classmethod
    def _kohya_optimizer_args(cls, v: Any) -> Any:
        # kohya takes `--optimizer_args weight_decay=0.01 betas=0.9,0.99`: "key=value" strings.
        if isinstance(v, str):
            v = v.split()
        if isinstance(v, list) and all(isinstance(item, str) for item in v):
            args: dict[str, Any] = {}
            for item in v:
                key, sep, value = item.partition("=")
                if not sep:
                    raise ValueError(f"write key=value pairs, e.g. weight_decay=0.01 (got {item!r})")
                args[key.strip()] = _plain_value(value.strip())
            return args
        return v

    @field_validator("resolution")
    @classmethod
    def _resolution_range(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        for side in v or ():
            if not 64 <= side <= 4096 or side % 8:
                raise ValueError(f"each side must be a multiple of 8 between 64 and 4096, got {v[0]}x{v[1]}")
        return v

    @field_validator("output_name")
    @classmethod
    def _output_name(cls, v: str) -> str:
        size = len(v.encode())
        if size > OUTPUT_NAME_BYTES:
            raise ValueError(
                f"is {size} bytes in UTF-8 and can be at most {OUTPUT_NAME_BYTES} (about "
                f"{OUTPUT_NAME_BYTES // 3} Japanese or {OUTPUT_NAME_BYTES // 4} emoji characters): every file "
                f"training writes, such as NAME-000001.safetensors, must fit the file system's "
                f"{FILE_NAME_BYTES} bytes"
            )
        return _file_name(v)

    @field_validator("caption_extension")
    @classmethod
    def _caption_ext(cls, v: str) -> str:
        return _dotted(v)

    @model_validator(mode="after")
    def _consistent(self) -> TrainSpec:
        if self.network_train_unet_only and self.network_train_text_encoder_only:
            raise ValueError("network_train_unet_only and network_train_text_encoder_only cannot both be set")
        if self.min_bucket_reso and self.max_bucket_reso and self.min_bucket_reso > self.max_bucket_reso:
            raise ValueError("min_bucket_reso must not exceed max_bucket_reso")
        if self.max_train_epochs is None and self.max_train_steps is None:
            raise ValueError("set max_train_epochs or max_train_steps")
        if self.sample_every_n_epochs and self.sample_every_n_steps:
            # kohya would silently drop the steps; a member who set both is told instead.
            raise ValueError("set sample_every_n_epochs or sample_every_n_steps, not both")
        if (self.conv_alpha is not None) and self.conv_dim is None:
            raise ValueError("conv_alpha needs conv_dim")
        return self

    # Derived values the trainer and metadata share.
    @property
    def effective_unet_lr(self) -> float:
        return self.learning_rate if self.unet_lr is None else self.unet_lr

    @property
    def effective_text_encoder_lr(self) -> float:
        return self.learning_rate if self.text_encoder_lr is None else self.text_encoder_lr

    @property
    def train_unet(self) -> bool:
        return not self.network_train_text_encoder_only and self.effective_unet_lr > 0

    @property
    def train_text_encoder(self) -> bool:
        return not self.network_train_unet_only and self.effective_text_encoder_lr > 0

    def warmup_steps(self, total_steps: int) -> int:
        w = self.lr_warmup_steps
        return int(w * total_steps) if 0 < w < 1 else int(w)

    def lr_schedule(self, total_steps: int) -> tuple[LrScheduler, int]:
        """(the diffusers schedule to use, its warmup steps) for a run of ``total_steps``."""
        warmup = self.warmup_steps(total_steps)
        if self.lr_scheduler == "constant" and warmup:
            return "constant_with_warmup", warmup
        return self.lr_scheduler, warmup

    def run_length(self, batches_per_epoch: int) -> RunLength:
        """Epochs and optimizer steps for an epoch of ``batches_per_epoch`` batches (kohya's arithmetic)."""
        per_epoch = max(math.ceil(batches_per_epoch / self.gradient_accumulation_steps), 1)
        if self.max_train_epochs:
            return RunLength(self.max_train_epochs, self.max_train_epochs * per_epoch, per_epoch)
        steps = self.max_train_steps or 0
        return RunLength(math.ceil(steps / per_epoch), steps, per_epoch)

    def sample_epochs_every(self) -> int:
        """Epochs between previews (0: none at epoch ends), with the defaults spelt out in the fields."""
        if self.sample_every_n_epochs is not None:
            return self.sample_every_n_epochs
        return 0 if self.sample_every_n_steps else self.save_every_n_epochs

    @classmethod
    def setting_names(cls) -> list[str]:
        return list(cls.model_fields)


def varying_caption_settings(spec: TrainSpec) -> list[str]:
    """The settings that change a caption from one step to the next, so that no encoding of it
    can be kept (kohya refuses them with cache_text_encoder_outputs)."""
    return [
        f"{name}={value}"
        for name, value in (
            ("shuffle_caption", spec.shuffle_caption),
            ("caption_dropout_rate", spec.caption_dropout_rate),
            ("caption_dropout_every_n_epochs", spec.caption_dropout_every_n_epochs),
            ("caption_tag_dropout_rate", spec.caption_tag_dropout_rate),
        )
        if value
    ]


class TextEncoding(BaseModel):
    """Which text encoders run on every training step, which are run once per caption (their outputs
    cached), and the settings that decide it."""

    every_step: tuple[str, ...]
    cached: tuple[str, ...]
    reasons: tuple[str, ...]

    @property
    def message(self) -> str | None:
        """One line for the member, or None when every caption is encoded once."""
        if not self.every_step:
            return None
        who = " and ".join(self.every_step)
        text = f"{who} {'runs' if len(self.every_step) == 1 else 'run'} on every step ({', '.join(self.reasons)})"
        if self.cached:
            text += f"; {' and '.join(self.cached)} encodes each caption once"
        return text


class IntakeSpec(_Spec):
    """Files, folders and zips from a member → one kohya folder ``output_dir/{num_repeats}_{name}/``."""

    sources: list[str] = Field(min_length=1)
    output_dir: str
    name: Annotated[str, Field(min_length=1, max_length=120), AfterValidator(_file_name)] | None = Field(
        None, description="the folder after 'N_'; defaults to output_dir's own name"
    )
    num_repeats: int = Field(10, ge=1, le=1000)
    caption_extension: CaptionExtension = ".txt"
    resolution: int = Field(512, ge=64, le=4096, description="training side; smaller images are flagged")
    min_side: int = Field(128, ge=8, le=4096, description="images with a shorter side are refused")
    max_images: int = Field(
        200, ge=1, le=100_000, description="images per dataset, those already there included"
    )
    max_file_mb: float = Field(50, gt=0, le=4096)
    max_megapixels: float = Field(50, gt=0, le=1000)
    max_zip_mb: float = Field(2048, gt=0, le=65536, description="everything a zip unpacks to")
    max_zip_ratio: float = Field(100, ge=1, le=100_000, description="unpacked/packed size of one zip member")
    max_zip_members: int = Field(
        2000,
        ge=1,
        le=1_000_000,
        description="entries in one zip (folders and captions included); a zip with more is refused "
        "whole, from its end record, before its directory is read or anything is unpacked",
    )
    duplicate_distance: int = Field(6, ge=0, le=64, description="perceptual-hash bits that may differ")


class TagSpec(_Spec):
    """Auto-tag a dataset folder with a WD14-style tagger and write its caption files."""

    train_data_dir: str
    tagger: str = Field(
        "wd-swinv2-tagger-v3",
        min_length=1,
        description="a SmilingWolf tagger name, a Hugging Face repo id, or a folder with model.onnx and selected_tags.csv",
    )
    cache_dir: str | None = Field(None, description="where downloaded taggers are kept")
    general_threshold: float = Field(0.35, ge=0.0, le=1.0)
    character_threshold: float = Field(0.85, ge=0.0, le=1.0)
    keep_rating_tags: bool = False
    trigger_word: str | None = None
    remove: list[str] = Field(default_factory=list)
    add: list[str] = Field(default_factory=list, description="tags put right after the trigger word")
    mode: Literal["keep", "replace", "merge"] = Field(
        "keep", description="what happens to captions that already exist"
    )
    caption_extension: CaptionExtension = ".txt"
    preset: Literal["character", "style", "concept"] | None = Field(
        None, description="character (or unset): suggest subject tags to bake into the trigger word"
    )
    suggest_min_share: float = Field(0.5, gt=0.0, le=1.0, description="share of images a suggested tag is on")
    batch_size: int = Field(8, ge=1, le=256)


CAPTION_TASKS = {
    "caption": "<CAPTION>",
    "detailed": "<DETAILED_CAPTION>",
    "more_detailed": "<MORE_DETAILED_CAPTION>",
}


def _caption_task(v: Any) -> Any:
    # Members write the short names; Florence-2's own task tokens are accepted as well.
    return CAPTION_TASKS.get(v.strip().lower(), v.strip()) if isinstance(v, str) else v


class CaptionSpec(_Spec):
    """Caption a dataset folder in sentences with Florence-2 and write its caption files."""

    train_data_dir: str
    captioner: str = Field(
        "florence2-large",
        min_length=1,
        description="florence2-large, florence2-base, or a folder holding a Florence-2 model in "
        "transformers' own format (config.json, weights, processor and tokenizer files)",
    )
    cache_dir: str | None = Field(None, description="where downloaded captioners are kept")
    task: Annotated[
        Literal["<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>"], BeforeValidator(_caption_task)
    ] = Field(
        "<DETAILED_CAPTION>",
        description="Florence-2's task (or caption | detailed | more_detailed). DETAILED_CAPTION's two or "
        "three sentences fit CLIP's 75 tokens more often than MORE_DETAILED_CAPTION's paragraph, which "
        "also invents more; choose more_detailed for Flux and Z-Image, whose text encoders read 512 tokens",
    )
    trigger_word: str | None = None
    trigger_style: Literal["subject", "photo_of"] = Field(
        "subject",
        description="subject: 'zzk, a woman with …' (the trigger is the caption's first comma-separated "
        "part, so keep_tokens=1 keeps it first when captions are shuffled, and it is never cut off by a "
        "token limit); photo_of: 'a photo of zzk, a woman with …'",
    )
    prefix: str | None = Field(None, description="text after the trigger and before the caption")
    mode: Literal["replace", "append", "prepend", "keep"] = Field(
        "replace",
        description="existing captions: replaced, the new caption after them (append) or before them "
        "(prepend); keep captions only the images without one",
    )
    max_words: int | None = Field(
        None, ge=3, le=1000, description="the model's caption cut to this many words at a sentence end"
    )
    caption_extension: CaptionExtension = ".txt"
    batch_size: int = Field(8, ge=1, le=256)
    num_beams: int = Field(3, ge=1, le=16, description="beam search width (the model card's 3)")
    max_new_tokens: int = Field(256, ge=8, le=4096, description="the longest caption generated, in tokens")


LoraStrength = Annotated[float, Field(ge=-10.0, le=10.0)]  # a LoRA's weight, in /gen and in grids


class LoraWeight(_Spec):
    name: str = Field(
        min_length=1, description="a LoRA's file name in lora_dir (without .safetensors), or a path"
    )
    weight: LoraStrength = 1.0


def _gen_sampler(v: Any) -> Any:
    # Members type sampler names in any case ("euler a", "dpm++ 2m karras").
    if isinstance(v, str):
        for name in GenSampler.__args__:
            if v.strip().lower() == name.lower():
                return name
    return v


class GenSettings(_Spec):
    """What every generation job sets besides its prompts and LoRAs (the base, the sampler, the
    image): GenSpec and GridSpec hold these fields, so their limits are written once."""

    base: str = Field(min_length=1, description="tiny:sd15, a .safetensors file or a diffusers folder")
    output_dir: str
    negative_prompt: str = ""
    lora_dir: str | None = None
    seed: int | None = Field(
        None, ge=0, le=2**32 - 1, description="gen: image i gets seed + i; grid: every cell; unset: random"
    )
    steps: int = Field(20, ge=1, le=150)
    cfg_scale: float = Field(7.0, ge=1.0, le=30.0)
    guidance_scale: float = Field(
        3.5, ge=0.0, le=30.0, description="Flux dev's distilled guidance (Forge's Distilled CFG Scale)"
    )
    width: int | None = Field(
        None, ge=64, le=4096, multiple_of=8, description="unset: the base's native size"
    )
    height: int | None = Field(None, ge=64, le=4096, multiple_of=8)
    clip_skip: int | None = Field(None, ge=1, le=12)
    sampler: Annotated[GenSampler, BeforeValidator(_gen_sampler)] = "DPM++ 2M Karras"


class GenSpec(GenSettings):
    """Text-to-image with LoRAs; the prompt may carry A1111's ``<lora:name:weight>`` tags."""

    prompt: str
    loras: list[LoraWeight] = Field(
        default_factory=list, description="besides the prompt's tags; a tag for the same LoRA wins"
    )
    count: int = Field(1, ge=1, le=16)


# A grid's rows are epochs × prompts: at most 64 rows keep its PNG one a phone can open.
GRID_EPOCHS, GRID_PROMPTS = 16, 4


class GridSpec(GenSettings):
    """One training run's epochs × weights: a row per saved epoch (and prompt), a column per LoRA
    weight, every cell the same seed. Ends in an ImagesEvent with the one grid PNG."""

    lora_dir: str = Field(min_length=1, description="the training run's output folder")
    name: Annotated[str, Field(min_length=1, max_length=120), AfterValidator(_file_name)] = Field(
        description="the run's output_name: its epochs are NAME-000001.safetensors …"
    )
    weights: list[LoraStrength] = Field(min_length=1, max_length=8, description="the columns")
    prompts: list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1, max_length=GRID_PROMPTS, description="rows per epoch"
    )
    epochs: (
        Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1, max_length=GRID_EPOCHS)] | None
    ) = Field(None, description="saved epochs to show, in this order; unset: every saved epoch")

    def template(self, **update: Any) -> GenSpec:
        """The GenSpec every cell starts from: the settings given here (only those given, so a
        family's defaults still apply as they do for /gen), with ``update`` on top."""
        given = self.model_dump(include=set(GenSettings.model_fields), exclude_unset=True)
        return GenSpec.model_validate({**given, "prompt": "", **update})


# ---- Events: what the worker streams back, one JSON object a line ----

# What a worker charges for: wall time from when the job really starts on the worker to its end,
# less the time a training job lent to short jobs served between its steps (never the wait in
# the queue or for a step). The worker stamps it on every final event.
_OWN_SECONDS = "the job's own compute time in seconds, stamped by the worker"
FINAL = ("done", "failed", "images", "tagged", "captioned")  # the event types that end a job


class StageEvent(_Spec):
    type: Literal["stage"] = "stage"
    stage: str
    message: str
    current: int | None = None
    total: int | None = None
    seconds: float | None = Field(None, description="how long the stage took (compile), once it is over")


class ProgressEvent(_Spec):
    type: Literal["progress"] = "progress"
    step: int
    total_steps: int
    epoch: int
    total_epochs: int | None = None  # None only in events of older workers
    loss: float = Field(
        description="moving average over optimizer steps of each step's mean micro-batch loss"
    )
    lr: float
    eta_s: float
    samples_per_s: float


class EpochEvent(_Spec):
    type: Literal["epoch"] = "epoch"
    epoch: int
    step: int
    lora_file: str
    sample_images: list[str] = Field(default_factory=list)
    sample_prompts: list[str] = Field(default_factory=list)


class SamplesEvent(_Spec):
    """Previews at a moment that was not saved (a step, the start, an epoch between saves); the
    previews of a saved epoch come in its EpochEvent."""

    type: Literal["samples"] = "samples"
    epoch: int = Field(description="the epoch being trained, or the one just finished; 0 before training")
    step: int
    end_of_epoch: bool = Field(description="rendered after the epoch's last step")
    sample_images: list[str]
    sample_prompts: list[str]


class DoneEvent(_Spec):
    type: Literal["done"] = "done"
    lora_file: str
    epoch_files: list[str]
    steps: int
    seconds: float = Field(description=_OWN_SECONDS)


class FailedEvent(_Spec):
    type: Literal["failed"] = "failed"
    kind: Literal["bad_input", "out_of_memory", "cancelled", "error"]
    reason: str
    seconds: float | None = Field(None, description=_OWN_SECONDS)


class TagCount(_Spec):
    tag: str
    count: int
    share: float


class TaggedEvent(_Spec):
    """The end of a tag job: what the bot shows the member before training."""

    type: Literal["tagged"] = "tagged"
    images: int
    captions_written: int
    tag_summary: list[TagCount] = Field(description="every tag but the trigger word, most frequent first")
    suggested_removals: list[str] = Field(default_factory=list)
    tag_frequency: dict[str, dict[str, int]] = Field(
        description="kohya's ss_tag_frequency: {folder: {tag: count}}"
    )
    skipped: list[tuple[str, str]] = Field(default_factory=list, description="(file, reason)")
    seconds: float | None = Field(None, description=_OWN_SECONDS)


class CaptionedEvent(_Spec):
    """The end of a caption job: what the bot shows the member before training."""

    type: Literal["captioned"] = "captioned"
    images: int
    captions_written: int
    captioner: str = Field(description="the model that wrote them: a repo id or a folder")
    tag_summary: list[TagCount] = Field(
        description="words and phrases (tags, in tag-list captions) of the captions, trigger and prefix "
        "left out, the 300 most frequent, most frequent first: runner.data.captions says what a phrase is"
    )
    examples: list[tuple[str, str]] = Field(
        default_factory=list, description="(file, caption) of the first few images, to show"
    )
    skipped: list[tuple[str, str]] = Field(default_factory=list, description="(file, reason)")
    seconds: float | None = Field(None, description=_OWN_SECONDS)


class ImagesEvent(_Spec):
    """The end of a gen or grid job: the PNGs written, each with its A1111 ``parameters`` text."""

    type: Literal["images"] = "images"
    images: list[str]
    parameters: list[str]
    seeds: list[int]
    seconds: float = Field(description=_OWN_SECONDS)


AnyEvent = (
    StageEvent
    | ProgressEvent
    | EpochEvent
    | SamplesEvent
    | DoneEvent
    | FailedEvent
    | TaggedEvent
    | CaptionedEvent
    | ImagesEvent
)
Event = Annotated[AnyEvent, Field(discriminator="type")]


class _EventBox(BaseModel):
    event: Event


def parse_event(line: str | dict[str, Any]) -> AnyEvent:
    data = json.loads(line) if isinstance(line, str) else line
    return _EventBox.model_validate({"event": data}).event


def load_toml_settings(path: str | Path) -> dict[str, Any]:
    """Settings from a kohya-style TOML file: top-level keys or any table of them, flattened."""
    import tomllib

    with open(path, "rb") as f:
        data = tomllib.load(f)
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in ("optimizer_args",):
            flat.update(value)
        else:
            flat[key] = value
    return flat
