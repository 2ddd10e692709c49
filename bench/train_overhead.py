"""loracord's training step against a bare training loop on the same base, side by side (issue 17).

In one process, for each base and batch size, loracord (``runner.train.loop.train``, the worker's
call, cached latents and text) and the bare loop written here take turns step by step: each
loracord step is followed by one bare step, run from loracord's ProgressEvent callback. Each round
(one ``train`` run; ``--rounds`` of them) runs ``--warmup + --steps`` steps and only the last
``--steps`` pairs count (the first ones pay allocator growth and first-call costs). Neighbouring
steps share whatever load a shared machine has at that second, so the figure is the median over
all pairs of the speed ratio loracord ÷ bare (bare step's seconds ÷ loracord step's seconds).

The bare loop is what a person would write with diffusers and peft: the same base (built by
``load_base``), the same LoRA modules (the names loracord targets, from the family, with the same
rank and alpha, added with peft's ``LoraConfig``), latents and text embeddings computed once, the
epsilon objective on ``DDPMScheduler.add_noise``, MSE, AdamW, grad clipping at norm 1, a constant
learning rate and one ``loss.item()`` a step (every trainer reads its loss for its progress bar).

    python -m bench.train_overhead --bases tiny:sd15 random:sd15 --batches 1 4 --rounds 2

Goal: loracord ≥ 0.97 × bare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from runner.families.registry import family, load_base
from runner.spec import ProgressEvent, TrainSpec
from runner.train.loop import train

from .common import SHARED, emit, log
from .data import kohya_dataset
from .prepare import prepare
from .train_loracord import base_of

ROOT = Path(__file__).parent.parent
GOAL = 0.97
IMAGES = 4
SIZE = 64


def dataset(root: Path, rounds_steps: int, batch: int, size: int) -> Path:
    # Enough repeats that a round is one epoch: no epoch boundary (reseeding, saving) inside the timing.
    repeats = -(-rounds_steps * batch // IMAGES) + 1
    return kohya_dataset(root, count=IMAGES, repeats=repeats, size=(size, size))


def spec_for(
    base: str, data: Path, out: Path, batch: int, steps: int, precision: str, size: int
) -> TrainSpec:
    return TrainSpec.parse(
        {
            **SHARED,
            "output_name": "overhead",
            "base": base,
            "train_data_dir": str(data),
            "output_dir": str(out),
            "resolution": size,
            "train_batch_size": batch,
            "mixed_precision": precision,
            "sample_every_n_epochs": 0,
            "max_train_epochs": None,
            "max_train_steps": steps,
            "save_every_n_epochs": 10000,
        }
    )


def paired_round(
    spec: TrainSpec, warmup: int, device: str | None, bare: Bare
) -> tuple[list[float], list[float]]:
    """One ``train`` run with a bare step after each of its steps, run inside its ProgressEvent
    callback, so the two take turns step by step and share whatever load the machine has at that
    second. Returns the seconds of loracord's steps and of the bare ones after the first ``warmup``.

    A loracord step is timed from the end of the bare step before it to its own ProgressEvent: all
    of the loop's work for the step (batch, loss, backward, clipping, optimizer, loss read, event)."""
    ours: list[float] = []
    theirs: list[float] = []
    resumed: float | None = None  # when control went back to the trainer after the last bare step

    def on_event(event: Any) -> None:
        nonlocal resumed
        if not isinstance(event, ProgressEvent):
            return
        arrived = time.perf_counter()
        if resumed is not None and event.step > warmup:
            ours.append(arrived - resumed)
        bare.step()
        resumed = time.perf_counter()
        if event.step > warmup:
            theirs.append(resumed - arrived)

    result = train(spec, on_event, device=device)
    if result.type != "done":
        raise SystemExit(f"loracord training failed: {result.reason}")
    return ours, theirs


class Bare:
    """A training loop written out with diffusers and peft, set up once and run for a few steps a round."""

    def __init__(self, spec: TrainSpec, data: Path, device: torch.device):
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig
        from PIL import Image

        self.device, self.batch = device, spec.train_batch_size
        # As loracord (and diffusers' examples) do it: frozen weights in the compute dtype on a GPU,
        # fp32 LoRA weights, autocast around the UNet; plain fp32 on a CPU.
        self.autocast = spec.mixed_precision != "no"
        self.dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            spec.mixed_precision
        ]
        weight_dtype = self.dtype if device.type == "cuda" else torch.float32
        base = load_base(spec.base)
        # loracord's own choice of modules, so both sides train the same number of LoRA layers.
        targets = family(base.family).lora_targets(base, spec, None)["unet"]
        self.modules = len(targets)
        unet, vae, te, tok = base.unet, base.vae, base.text_encoders[0], base.tokenizers[0]
        for m in (unet, vae, te):
            m.requires_grad_(False)
        unet.to(device, weight_dtype)
        te.to(device, weight_dtype)
        vae.to(device)
        with torch.no_grad():
            files = sorted(p for p in next(data.iterdir()).iterdir() if p.suffix == ".png")
            self.latents, self.text = [], []
            for f in files:
                px = torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32))  # H, W, 3
                px = (px.permute(2, 0, 1) / 127.5 - 1).unsqueeze(0).to(device)
                self.latents.append(vae.encode(px).latent_dist.sample() * vae.config.scaling_factor)
                ids = tok(
                    f.with_suffix(".txt").read_text(),
                    padding="max_length",
                    max_length=tok.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids.to(device)
                self.text.append(te(ids)[0].to(weight_dtype))
        base.vae = None
        base.text_encoders = []  # only the UNet trains; the encoders' outputs are cached above
        config = LoraConfig(
            r=spec.network_dim,
            lora_alpha=spec.network_alpha,
            target_modules=[t.name for t in targets],
            init_lora_weights="gaussian",
        )
        unet.add_adapter(config)
        cast_training_params(unet, dtype=torch.float32)
        unet.train()
        self.unet = unet
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=spec.learning_rate)
        self.lr = get_scheduler("constant", self.optimizer)
        self.noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
        self.noise_scheduler.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(device)
        self.at = 0

    def step(self) -> float:
        n = len(self.latents)
        pick = [(self.at + i) % n for i in range(self.batch)]
        self.at += self.batch
        latents = torch.cat([self.latents[i] for i in pick])
        text = torch.cat([self.text[i] for i in pick])
        noise = torch.randn_like(latents)
        t = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=self.device
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        with torch.autocast(self.device.type, self.dtype, enabled=self.autocast):
            pred = self.unet(noisy, t, text).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.lr.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def loadable(name: str, work: Path) -> str:
    """What both sides load ``name`` from: tiny bases by name, full-size ones from a single file
    written once by ``bench.prepare`` (building 860M random weights costs more than the whole
    measurement; a file loads in seconds, as members' checkpoints do)."""
    if name.startswith("tiny:"):
        return name
    return base_of(prepare(name, work / f"overhead-{name.replace(':', '-')}", IMAGES, 1))


def measure(args: argparse.Namespace, name: str, batch: int, tmp: Path) -> dict[str, Any]:
    base = loadable(name, args.work)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = args.precision or ("bf16" if device.type == "cuda" else "no")
    total = args.warmup + args.steps
    data = dataset(tmp / f"data-{batch}", total, batch, args.size)
    spec = spec_for(base, data, tmp / "out", batch, total, precision, args.size)
    load_before = os.getloadavg()
    log(f"train_overhead: {name} batch {batch}, load {load_before[0]:.2f}: bare setup")
    started = time.monotonic()
    bare = Bare(spec, data, device)
    ours: list[list[float]] = []
    theirs: list[list[float]] = []
    for r in range(args.rounds):
        o, t = paired_round(spec, args.warmup, args.device, bare)
        ours.append(o)
        theirs.append(t)
        log(f"  round {r + 1}: loracord {len(o) / sum(o):.3f} steps/s, bare {len(t) / sum(t):.3f} steps/s")
    del bare
    # Speed ratio of each pair of neighbouring steps (loracord's step k, then the bare step k).
    ratios = [b / a for o, t in zip(ours, theirs, strict=True) for a, b in zip(o, t, strict=True)]
    median = statistics.median(ratios)
    per_round = [(len(o) / sum(o), len(t) / sum(t)) for o, t in zip(ours, theirs, strict=True)]
    return emit(
        "loracord",
        "train_overhead",
        base=name,
        loaded_from="name" if base == name else "single file",
        settings={
            "resolution": args.size,
            "batch": batch,
            "precision": precision,
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "warmup_steps_excluded": args.warmup,
            "order": "loracord step, bare step, alternating",
            **SHARED,
        },
        load_before=[round(v, 2) for v in load_before],
        load_after=[round(v, 2) for v in os.getloadavg()],
        loracord_steps_per_s=[round(o, 6) for o, _ in per_round],
        bare_steps_per_s=[round(t, 6) for _, t in per_round],
        round_ratios=[round(o / t, 4) for o, t in per_round],
        ratios=[round(v, 4) for v in ratios],
        loracord_step_s=round(statistics.median([v for o in ours for v in o]), 4),
        bare_step_s=round(statistics.median([v for t in theirs for v in t]), 4),
        loracord_samples_per_s=round(statistics.median([o for o, _ in per_round]) * batch, 4),
        bare_samples_per_s=round(statistics.median([t for _, t in per_round]) * batch, 4),
        median_ratio=round(median, 4),
        goal=GOAL,
        meets_goal=median >= GOAL,
        seconds=round(time.monotonic() - started, 2),
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bases", nargs="+", default=["tiny:sd15", "random:sd15"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    p.add_argument("--size", type=int, default=SIZE, help="image side")
    p.add_argument(
        "--rounds", type=int, default=2, help="train runs, each paired step by step with the bare loop"
    )
    p.add_argument("--steps", type=int, default=6, help="timed steps a round")
    p.add_argument("--warmup", type=int, default=2, help="steps a round leaves out (at least 1)")
    p.add_argument(
        "--precision", default=None, choices=["no", "fp16", "bf16"], help="default: bf16 on a GPU, else no"
    )
    p.add_argument("--device", default=None)
    p.add_argument(
        "--work", type=Path, default=ROOT / "bench/out", help="where full-size bases are written once"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error(
            "--warmup and --steps must be at least 1 (a loracord step is timed from the bare step before it)"
        )
    log(f"train_overhead: {args}")
    with tempfile.TemporaryDirectory(prefix="loracord-overhead-") as tmp:
        for base in args.bases:
            for batch in args.batches:
                measure(args, base, batch, Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
