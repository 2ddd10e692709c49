"""What every benchmark shares: the record it prints, the machine it ran on, and step clocks.

Each benchmark script prints one JSON object per measurement on stdout (``emit``) and nothing
else there; logs go to stderr.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import IO, Any

# The settings every trainer gets (diffusers' example and kohya take the same ones in train_ref.py, by their own names).
SHARED = {
    "network_dim": 16,
    "network_alpha": 16,
    "learning_rate": 1e-4,
    "lr_scheduler": "constant",
    "optimizer_type": "AdamW",
    "network_train_unet_only": True,
    "cache_latents": True,
    "cache_text_encoder_outputs": True,
    "enable_bucket": False,
    "max_grad_norm": 1.0,
}

PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate")


def versions(packages: Iterable[str] = PACKAGES) -> dict[str, str]:
    out = {}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def machine() -> dict[str, Any]:
    """Where a figure was taken: the GPU by name when there is one, else the CPU."""
    info: dict[str, Any] = {"host_cpus": os.cpu_count(), "python": platform.python_version()}
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_mem_gib": round(props.total_memory / 2**30, 1)}
        info["cuda"] = torch.version.cuda
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def emit(tool: str, metric: str, **fields: Any) -> dict[str, Any]:
    """Print one measurement as a JSON line and return it."""
    record = {
        "tool": tool,
        "metric": metric,
        **fields,
        "machine": machine(),
        "versions": versions(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    print(json.dumps(record, ensure_ascii=False), flush=True)
    return record


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def peak_vram_mib() -> float | None:
    """The torch allocator's peak since the last reset, or None off a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


class VramPoll:
    """The GPU's used memory, polled by nvidia-smi in the background; nothing off a GPU."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        with contextlib.suppress(FileNotFoundError):  # no nvidia-smi: no GPU to poll
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "200"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )

    def stop(self) -> float | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        values = [float(v) for v in out.split() if v.replace(".", "", 1).isdigit()]
        return max(values) if values else None


@dataclass
class StepClock:
    """Steps seen over time, from any trainer's own progress report; a steady-state rate from them.

    The first ``warmup`` steps (compilation, allocator growth, cuDNN autotuning) are left out of
    the rate, so trainers that start differently are compared on the steps that repeat.
    """

    warmup: int
    seen: list[tuple[float, int]] = field(default_factory=list)

    def step(self, n: int, at: float | None = None) -> None:
        if not self.seen or n > self.seen[-1][1]:
            self.seen.append((time.monotonic() if at is None else at, n))

    def steps_per_s(self) -> float | None:
        window = [(t, n) for t, n in self.seen if n >= self.warmup]
        if len(window) < 2 or window[-1][0] <= window[0][0]:
            return None
        (t0, n0), (t1, n1) = window[0], window[-1]
        return (n1 - n0) / (t1 - t0)

    @property
    def last(self) -> int:
        return self.seen[-1][1] if self.seen else 0


# tqdm's bar as diffusers' examples ("Steps") and kohya ("steps") print it: "Steps:  40%|███▌ | 4/10 [...]".
_TQDM = re.compile(r"(?:^|\s)[Ss]teps:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")


def tqdm_steps(stream: IO[bytes]) -> Iterator[tuple[str, int | None]]:
    """Each piece of a child's stderr (split on ``\\r`` and ``\\n``), with the training step it shows."""
    buf = b""
    while chunk := stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096):
        buf += chunk
        *pieces, buf = re.split(rb"[\r\n]", buf)
        for piece in pieces:
            text = piece.decode("utf-8", "replace")
            m = _TQDM.search(text)
            yield text, int(m[1]) if m else None
    if buf:
        text = buf.decode("utf-8", "replace")
        m = _TQDM.search(text)
        yield text, int(m[1]) if m else None
