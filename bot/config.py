"""The server's settings: one TOML file (see config.example.toml) plus the environment.

Relative paths are relative to the config file. The Discord token never comes from the TOML
file: only from ``LORACORD_DISCORD_TOKEN`` or the secret file named by ``[discord] token_file``
or ``LORACORD_DISCORD_TOKEN_FILE``, so the config can be shared and committed safely.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

TOKEN_ENV = "LORACORD_DISCORD_TOKEN"
TOKEN_FILE_ENV = "LORACORD_DISCORD_TOKEN_FILE"


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and what to do."""


class _Section(BaseModel):
    # inf and nan are never a setting: they would reach the scheduler's arithmetic.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


UNLIMITED = "unlimited"
# The most each quota can be; the word "unlimited" (TOML, /admin quota, `loracord quota set`)
# means exactly this, so limits stay finite numbers every sum and comparison can use.
QUOTA_CEILINGS: dict[str, float] = {
    "concurrent_jobs": 1000,
    "queued_jobs": 10_000,
    "daily_gpu_seconds": 86_400_000,  # a thousand GPUs all day
    "images_per_dataset": 100_000,
    "total_steps": 10_000_000,
    "storage_mb": 100_000_000,  # 100 TB
    "open_drafts": 1000,
}


class _Limits(_Section):
    @field_validator("*", mode="before")
    @classmethod
    def _unlimited(cls, v: object, info: ValidationInfo) -> object:
        if isinstance(v, str) and v.strip().lower() == UNLIMITED and info.field_name in QUOTA_CEILINGS:
            return QUOTA_CEILINGS[info.field_name]
        return v


def _limit(default: float | None, key: str, description: str = "") -> Any:
    return Field(default, ge=0, le=QUOTA_CEILINGS[key], description=description)


class Quota(_Limits):
    """Limits per member; a role's override replaces a default, the most generous role wins."""

    concurrent_jobs: int = _limit(1, "concurrent_jobs", "jobs running at once")
    queued_jobs: int = _limit(3, "queued_jobs", "jobs waiting in the queue")
    daily_gpu_seconds: float = _limit(3600, "daily_gpu_seconds", "'stamina': GPU time in any 24 hours")
    images_per_dataset: int = _limit(200, "images_per_dataset")
    total_steps: int = _limit(4000, "total_steps", "training steps of one job")
    storage_mb: float = _limit(2048, "storage_mb", "LoRA files kept")
    open_drafts: int = _limit(3, "open_drafts", "/train threads not started yet")

    @classmethod
    def names(cls) -> list[str]:
        return list(cls.model_fields)


class QuotaOverride(_Limits):
    concurrent_jobs: int | None = _limit(None, "concurrent_jobs")
    queued_jobs: int | None = _limit(None, "queued_jobs")
    daily_gpu_seconds: float | None = _limit(None, "daily_gpu_seconds")
    images_per_dataset: int | None = _limit(None, "images_per_dataset")
    total_steps: int | None = _limit(None, "total_steps")
    storage_mb: float | None = _limit(None, "storage_mb")
    open_drafts: int | None = _limit(None, "open_drafts")


def quota_value(key: str, text: str) -> float | None:
    """What an admin typed for quota ``key``: a number in range, ``unlimited`` (the key's ceiling),
    or ``default`` (None: the override goes). Anything else is a ConfigError saying what is allowed."""
    if key not in QUOTA_CEILINGS:
        raise ConfigError(f"'{key}' is not a quota; the quotas are {', '.join(Quota.names())}")
    if text.strip().lower() == "default":
        return None
    try:
        return getattr(QuotaOverride.model_validate({key: text.strip()}), key)
    except ValidationError:
        whole = Quota.model_fields[key].annotation is int
        raise ConfigError(
            f"{key} takes {'a whole number' if whole else 'a number'} from 0 to {QUOTA_CEILINGS[key]:.0f}, "
            f"'{UNLIMITED}' (= {QUOTA_CEILINGS[key]:.0f}) or 'default'; not '{text}'"
        ) from None


class QuotaConfig(Quota):
    roles: dict[str, QuotaOverride] = Field(default_factory=dict, description="role id → overrides")


class Scheduling(_Section):
    fair_window_hours: float = Field(24, gt=0, le=24 * 365, description="GPU time counted for fair turns")
    seconds_per_step: float = Field(
        1.0, gt=0, le=3600, description="training estimate before any job finished, at 512² batch 1"
    )
    gen_seconds_per_step: float = Field(
        0.1, gt=0, le=3600, description="generation estimate per step and image at 512²"
    )
    poll_seconds: float = Field(0.2, gt=0, le=10, description="how often the database is read for new work")
    max_attempts: int = Field(
        3, ge=1, le=100, description="runs of one job before a crashing worker fails it"
    )
    overrun_grace_seconds: float = Field(
        600, ge=0, le=86400, description="GPU time a running job may go past its owner's daily quota"
    )


class DataConfig(_Section):
    """Bounds on what members' uploads and jobs may take of the disk (``dir`` is ``Config.data_dir``)."""

    min_free_gb: float = Field(
        2, ge=0, le=1e6, description="free disk below which uploads and new jobs are refused"
    )
    draft_days: float = Field(
        7, gt=0, le=3650, description="drafts and uploads not started within this are deleted"
    )
    max_zip_members: int = Field(
        2000, ge=1, le=1_000_000, description="entries in one zip; more: refused before anything is unpacked"
    )
    max_upload_mb: float = Field(500, gt=0, le=1e6, description="one attachment, streamed to disk")


class Workers(_Section):
    devices: list[str] = Field(default_factory=lambda: ["cuda:0"], min_length=1)
    dispatch: Literal["local", "ray"] = "local"
    stall_seconds: float = Field(
        900,
        ge=1,
        le=86400,
        description="a running job that sends no event for this long is stalled: its worker is "
        "restarted and the job resumes from its last saved epoch",
    )
    cancel_grace_seconds: float = Field(
        120,
        ge=1,
        le=3600,
        description="a cancelled job still running this long after the cancel has its worker restarted",
    )

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: list[str]) -> list[str]:
        for d in v:
            if not (d == "cpu" or d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit())):
                raise ValueError(f"'{d}' is not a device: use cpu, cuda or cuda:N")
        return v


class RayConfig(_Section):
    address: str | None = Field(
        None, description="ray://host:10001 or auto; unset starts Ray on this machine"
    )
    num_cpus: int | None = Field(None, ge=1, le=100_000, description="CPUs for a Ray started here")


class DiscordConfig(_Section):
    token_file: Path | None = None
    api_base: str = Field(
        "https://discord.com/api/v10", description="Discord's REST base (sets discord.http.Route.BASE)"
    )
    gateway: str = Field(
        "wss://gateway.discord.gg/", description="Discord's gateway (a plain Client connects there directly)"
    )
    guilds: list[int] = Field(
        default_factory=list, description="the servers the bot serves (their ids); it leaves any other"
    )
    public: bool = Field(
        False, description="serve every server the bot is added to (guilds unused); commands sync globally"
    )
    train_channel: int | None = Field(None, description="channel id where /train opens its threads")
    archive_minutes: Literal[60, 1440, 4320, 10080] = Field(
        1440, description="a training thread's auto-archive duration"
    )
    nsfw: Literal["spoiler", "refuse", "allow"] = Field(
        "spoiler", description="images in channels not marked NSFW: as spoilers, refused, or shown"
    )
    progress_seconds: float = Field(5.0, ge=0.05, le=600, description="least time between progress edits")
    retry_max_seconds: float = Field(
        30.0, ge=0.1, le=3600, description="longest wait between tries of a post Discord did not take"
    )
    tagger: str = Field(
        "wd-swinv2-tagger-v3", description="Auto-caption's tagger: a SmilingWolf name, a repo id or a folder"
    )
    captioner: str = Field(
        "florence2-large",
        description="Auto-caption's sentence captioner: florence2-large, florence2-base or a folder",
    )

    def check_served(self) -> None:
        """Refuse to run a bot that would serve whoever adds it, unless the owner said so."""
        if not self.guilds and not self.public:
            raise ConfigError(
                "[discord] guilds is empty: list the ids of the servers the bot serves "
                "(or set public = true to serve every server it is added to)"
            )

    def serves(self, guild_id: int | None) -> bool:
        """Whether the bot acts in this server (None: a DM, never served)."""
        return guild_id is not None and (self.public or guild_id in self.guilds)

    @field_validator("api_base", "gateway")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://", "ws://", "wss://")):
            raise ValueError(f"'{v}' is not a URL: start it with https:// (api_base) or wss:// (gateway)")
        return v.rstrip("/") if v.startswith("http") else v


class WebConfig(_Section):
    host: str = Field("127.0.0.1", description="address bot/web.py listens on")
    port: int = Field(8080, ge=0, le=65535, description="0: any free port")
    public_url: str | None = Field(
        None, description="the base of download links as members reach it; unset: http://host:port"
    )
    secret_file: Path | None = Field(
        None, description="the link-signing secret; unset: generated once in the data folder"
    )
    link_hours: float = Field(24, gt=0, le=24 * 365, description="how long a download link works")
    login_minutes: float = Field(
        15, gt=0, le=24 * 60, description="how long an Open in browser link can start a session"
    )
    session_hours: float = Field(12, gt=0, le=24 * 30, description="how long a browser session lasts")

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"'{v}' is not a URL: start it with https:// (or http://)")
        return v.rstrip("/") if v else v


class Config(_Section):
    path: Path = Field(description="the config file itself")
    store: Path
    data_dir: Path
    data: DataConfig = Field(default_factory=DataConfig)
    workers: Workers = Field(default_factory=Workers)
    ray: RayConfig = Field(default_factory=RayConfig)
    quota: QuotaConfig = Field(default_factory=QuotaConfig)
    scheduling: Scheduling = Field(default_factory=Scheduling)
    bases: dict[str, str] = Field(default_factory=dict)
    # Base name → a LoRA merged into that base while training (Z-Image-Turbo's training adapter).
    training_adapters: dict[str, str] = Field(default_factory=dict)
    discord: DiscordConfig = Field(default_factory=DiscordConfig)
    web: WebConfig = Field(default_factory=WebConfig)

    def base(self, name: str) -> str:
        """The base string for a name members see; refusal lists the names there are."""
        if name in self.bases:
            return self.bases[name]
        offered = ", ".join(sorted(self.bases)) or "none: add a [bases] table to the config"
        raise ConfigError(f"unknown base '{name}'; this server offers: {offered}")

    def discord_token(self) -> str:
        token = os.environ.get(TOKEN_ENV, "").strip()
        file = os.environ.get(TOKEN_FILE_ENV) or self.discord.token_file
        if not token and file:
            try:
                token = Path(file).read_text(encoding="utf-8").strip()
            except OSError as e:
                raise ConfigError(f"cannot read the Discord token file {file}: {e.strerror}") from None
        if not token:
            raise ConfigError(
                f"no Discord token: set {TOKEN_ENV}, or put it in a file named by "
                f"{TOKEN_FILE_ENV} or [discord] token_file (or run with --no-discord)"
            )
        return token


def _resolve(root: Path, value: str) -> str:
    if value.startswith(("tiny:", "random:")):
        return value
    return str((root / Path(value).expanduser()).resolve())


def load_config(path: str | Path) -> Config:
    path = Path(path).resolve()
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read the config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    discord = dict(raw.get("discord") or {})
    if "token" in discord:
        raise ConfigError(
            f"{path}: [discord] token must not be in the config file; set {TOKEN_ENV} "
            "or put the token in a secret file named by [discord] token_file"
        )
    root = path.parent
    try:
        store = (raw.get("store") or {}).get("path", "loracord.db")
        data_section = dict(raw.get("data") or {})
        data = data_section.pop("dir", "data")
        if discord.get("token_file"):
            discord["token_file"] = _resolve(root, discord["token_file"])
        if isinstance(discord.get("tagger"), str) and (root / Path(discord["tagger"]).expanduser()).is_dir():
            discord["tagger"] = _resolve(root, discord["tagger"])  # a folder, not a tagger's name
        if (
            isinstance(discord.get("captioner"), str)
            and (root / Path(discord["captioner"]).expanduser()).is_dir()
        ):
            discord["captioner"] = _resolve(root, discord["captioner"])
        web = dict(raw.get("web") or {})
        if web.get("secret_file"):
            web["secret_file"] = _resolve(root, web["secret_file"])
        return Config.model_validate(
            {
                "path": path,
                "store": _resolve(root, store),
                "data_dir": _resolve(root, data),
                "data": data_section,
                "workers": raw.get("workers") or {},
                "ray": raw.get("ray") or {},
                "quota": raw.get("quota") or {},
                "scheduling": raw.get("scheduling") or {},
                "bases": {k: _resolve(root, v) for k, v in (raw.get("bases") or {}).items()},
                "training_adapters": {
                    k: _resolve(root, v) for k, v in (raw.get("training_adapters") or {}).items()
                },
                "discord": discord,
                "web": web,
                **{k: v for k, v in raw.items() if k not in _SECTIONS},
            }
        )
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{path}: {problems}") from None
    except (TypeError, AttributeError) as e:
        raise ConfigError(f"{path}: a section has the wrong shape ({e})") from None


_SECTIONS = (
    "store",
    "data",
    "workers",
    "ray",
    "quota",
    "scheduling",
    "bases",
    "training_adapters",
    "discord",
    "web",
)
