"""The training loop: a folder of images in, one kohya-format LoRA per saved epoch out.

One readable loop in the manner of diffusers' ``train_text_to_image_lora.py``, without
accelerate: a worker owns exactly one GPU, so there is nothing to distribute, and plain
autocast + GradScaler keep every step visible here.
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file, save_file

from ..data.dataset import (
    CaptionRules,
    Dataset,
    DatasetError,
    ImageItem,
    epoch_batches,
    load_dataset,
    load_image,
)
from ..families.protocol import Base, Batch, Conditioning, ImageSize, ModelError
from ..families.registry import check_settings, family, load_base, text_encoding, with_preset
from ..formats.kohya import TrainingFacts, save_lora, training_metadata
from ..gen.sample_prompts import default_sample_prompts
from ..gen.sampler import Sampler, parse_sample_prompt, save_png
from ..outcome import Cancelled, JobFailed, run_to_event
from ..spec import (
    SPEED_SETTINGS,
    DoneEvent,
    EpochEvent,
    FailedEvent,
    ProgressEvent,
    SamplesEvent,
    SpecError,
    StageEvent,
    TrainSpec,
    epoch_file,
    sample_file,
    state_folder,
)
from .network import add_lora, kohya_state_dict, load_lora_state, lora_state, param_groups
from .optimizers import make_optimizer

Emit = Callable[[Any], None]
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}


class StepLoss:
    """One optimizer step's loss on its way to the host.

    On a GPU the copy is queued behind the step and marked with an event: `value` waits for that
    copy alone, not for work queued after it, so the next step can be queued before this one's
    loss is read (``loss_one_step_late``). On a CPU the tensor is already computed.
    """

    def __init__(self, loss: torch.Tensor, step: int, epoch: int, lr: float):
        self.step, self.epoch, self.lr = step, epoch, lr
        loss = loss.detach().float()
        self._event: torch.cuda.Event | None = None
        self._host = loss
        if loss.is_cuda:
            self._host = torch.empty((), dtype=torch.float32, pin_memory=True)
            self._host.copy_(loss, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(loss.device))

    def value(self) -> float:
        if self._event is not None:
            self._event.synchronize()
        return self._host.item()


def concrete_spec(spec: TrainSpec, base: Base) -> TrainSpec:
    """The spec with the preset applied under the member's own settings and sizes filled in."""
    merged = with_preset(spec, base.family)
    native = base.native_resolution
    res = merged["resolution"] or (native, native)
    merged["resolution"] = res
    merged["bucket_reso_steps"] = merged["bucket_reso_steps"] or min(64, native // 8)
    step = merged["bucket_reso_steps"]
    merged["min_bucket_reso"] = merged["min_bucket_reso"] or max(step, min(res) // 2 // step * step)
    merged["max_bucket_reso"] = merged["max_bucket_reso"] or max(res) * 2
    check_settings(merged, base)
    n_layers = base.text_encoders[0].config.num_hidden_layers
    if merged["clip_skip"] and merged["clip_skip"] > n_layers:
        raise SpecError(
            f"clip_skip must be between 1 and {n_layers} for this model (got {merged['clip_skip']})"
        )
    return TrainSpec.parse(merged)


class Trainer:
    """State of one training run; `run` is the loop."""

    def __init__(
        self,
        spec: TrainSpec,
        emit: Emit,
        cancel: threading.Event | None = None,
        device: str | torch.device | None = None,
    ):
        self.request = spec
        self.emit = emit
        self.cancel = cancel or threading.Event()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # ---- setup ----

    def _setup(self) -> None:
        self.emit(StageEvent(stage="load_model", message=f"loading {self.request.base}"))
        # Large DiTs as they are released, in bf16: they never pass through fp32 on the host.
        self.base = load_base(self.request.base, dtype=torch.bfloat16)
        self.family = family(self.base.family)
        self.spec = spec = concrete_spec(self.request, self.base)
        self.out = Path(spec.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.dataset: Dataset = load_dataset(spec)
        for name, why in self.dataset.skipped:
            self.emit(StageEvent(stage="dataset", message=f"skipped {name}: {why}"))
        self.rules = CaptionRules(spec)
        self.sampler: Sampler | None = None
        self.autocast_dtype = DTYPES[spec.mixed_precision]
        # Frozen weights live in the compute dtype on a GPU; on a CPU autocast handles it and
        # fp32 weights keep results exact and reproducible.
        weight_dtype = self.autocast_dtype if self.device.type == "cuda" else torch.float32
        self.family.prepare_training(self.base, spec, weight_dtype)
        self.base.to(self.device, weight_dtype)
        self.objective = self.family.objective(self.base, spec, self.device, self.autocast_dtype)
        # Sample lines are checked now, not after the first epoch's hour of training.
        entries = spec.sample_prompts or default_sample_prompts(
            spec.trigger_word, self.dataset.common_tags(8)
        )
        w, h = spec.resolution
        defaults = dict(
            width=w,
            height=h,
            steps=spec.sample_steps,
            sampler=spec.sample_sampler,
            **self.family.sample_defaults,
        )
        try:
            self.sample_prompts = [
                parse_sample_prompt(entry, seed=spec.seed + i, **defaults) for i, entry in enumerate(entries)
            ]
        except ValueError as e:
            raise SpecError(f"sample_prompts: {e}") from None
        torch.manual_seed(spec.seed)
        add_lora(self.base, spec)  # fp32 LoRA weights on the frozen base, whatever its dtype
        if spec.channels_last:
            # In place, LoRA weights included (the optimizer's states follow their parameters).
            self.base.unet.to(memory_format=torch.channels_last)
        if spec.gradient_checkpointing:
            if spec.train_unet:
                self.base.unet.enable_gradient_checkpointing()
            if spec.train_text_encoder:
                for te in self.base.text_encoders:
                    # Non-reentrant: transformers before 5 defaults to reentrant checkpointing, which
                    # passes no gradient to LoRA layers whose inputs (frozen embeddings) need none.
                    te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if spec.torch_compile:
            # In place: the module keeps its names (LoRA state, saving); the graphs are built by
            # _compile, before the first step.
            self.base.unet.compile(backend=spec.torch_compile_backend, dynamic=spec.torch_compile_dynamic)
        self.groups = param_groups(self.base, spec)
        if not self.groups:
            raise SpecError("nothing to train: unet_lr and text_encoder_lr (or block weights) are all 0")
        self.optimizer, optimizer_name = make_optimizer(spec, self.groups, self.device)
        self.scaler = torch.amp.GradScaler(
            enabled=spec.mixed_precision == "fp16" and self.device.type == "cuda"
        )

        self.batches_per_epoch = len(
            epoch_batches(self.dataset, spec.train_batch_size, 0, spec.seed, spec.flip_aug)
        )
        self.num_epochs, self.total_steps, self.steps_per_epoch = spec.run_length(self.batches_per_epoch)
        scheduler, warmup = spec.lr_schedule(self.total_steps)
        if scheduler != spec.lr_scheduler:
            # The spec (and so the metadata and the resume check) names the schedule that runs.
            self.spec = spec = spec.model_copy(update={"lr_scheduler": scheduler})
            self.emit(
                StageEvent(
                    stage="lr_scheduler",
                    message=f"{warmup} warmup steps asked with constant: using {scheduler}",
                )
            )
        self.lr_scheduler = get_scheduler(
            scheduler,
            self.optimizer,
            num_warmup_steps=warmup,
            num_training_steps=self.total_steps,
            num_cycles=spec.lr_scheduler_num_cycles,
            power=spec.lr_scheduler_power,
        )
        self.gen = torch.Generator(self.device)
        self.facts = TrainingFacts(
            session_id=str(uuid.uuid4().int >> 96),
            training_started_at=time.time(),
            num_train_images=self.dataset.num_train_images(),
            num_batches_per_epoch=self.batches_per_epoch,
            num_epochs=self.num_epochs,
            max_train_steps=self.total_steps,
            tag_frequency=self.dataset.tag_frequency(),
            dataset_dirs=self.dataset.dataset_dirs(),
            bucket_info=self.dataset.bucket_info(),
            optimizer=optimizer_name,
            lr_warmup_steps=warmup,
        )
        self.metadata = training_metadata(spec, self.base, self.facts)
        self._cache()

    def _cache(self) -> None:
        """Everything that does not change between steps is computed once, here."""
        spec = self.spec
        self.cond_cache: dict[str, Conditioning] = {}
        self.text = text_encoding(spec, self.base.family)
        if self.text.message:
            self.emit(StageEvent(stage="text_encoders", message=self.text.message))
        if self.text.cached:
            self.emit(StageEvent(stage="cache_text", message="encoding captions once"))
            captions = {self.rules.apply(item.caption, 0, random.Random(0)) for item in self.dataset.items}
            for caption in sorted(captions):
                self.cond_cache[caption] = self.objective.encode_text([caption], grad=False)
            # Before the latents: Flux's T5-XXL leaves the GPU before the VAE's activations need room.
            self.objective.text_cached()
        self.latent_cache: dict[tuple[str, bool], torch.Tensor] = {}
        if spec.cache_latents:
            flips = (False, True) if spec.flip_aug else (False,)
            todo = [(item, f) for item in self.dataset.items for f in flips]
            for i, (item, flip) in enumerate(todo):
                self._check_cancel()
                if i % 10 == 0:
                    self.emit(
                        StageEvent(
                            stage="cache_latents",
                            message="encoding images once with the VAE",
                            current=i,
                            total=len(todo),
                        )
                    )
                self.latent_cache[(str(item.path), flip)] = self._cached_latent(item, flip)

    # ---- per-step pieces ----

    def _latent_dist(self, items: list[ImageItem], flips: list[bool]) -> DiagonalGaussianDistribution:
        vae = self.base.vae
        pixels = []
        for item, flip in zip(items, flips, strict=True):
            px = load_image(item)[0]
            pixels.append(px.flip(-1) if flip else px)
        x = torch.stack(pixels).to(self.device, vae.dtype)
        with torch.no_grad():
            return vae.encode(x).latent_dist

    def _scaled(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.base.vae
        latents = latents.float()
        if vae.config.get("shift_factor") is not None:  # Flux's VAE centres its latents too
            latents = latents - vae.config.shift_factor
        return latents * vae.config.scaling_factor

    def _cached_latent(self, item: ImageItem, flip: bool) -> torch.Tensor:
        """kohya's cached path: one sample of the image's latent distribution, kept for the whole run.

        Each image draws from its own seed (from its place in the dataset), so the sample does not
        depend on batch position or where the dataset folder lives, and no two images share one
        noise pattern.
        """
        dist = self._latent_dist([item], [flip])
        relative = item.path.relative_to(Path(self.spec.train_data_dir).expanduser()).as_posix()
        seeded = torch.Generator().manual_seed(self.spec.seed ^ zlib.crc32(relative.encode()))
        noise = torch.randn(dist.mean.shape[1:], generator=seeded).to(dist.mean.device, dist.mean.dtype)
        return self._scaled(dist.mean[0] + dist.std[0] * noise)

    def _batch(self, pairs: list[tuple[ImageItem, bool]], epoch: int, rng: random.Random) -> Batch:
        items = [p[0] for p in pairs]
        flips = [p[1] for p in pairs]
        if self.spec.cache_latents:
            latents = torch.stack([self.latent_cache[(str(i.path), f)] for i, f in pairs])
        else:
            # kohya's uncached path: a fresh sample of the latent distribution every step.
            latents = self._scaled(self._latent_dist(items, flips).sample(generator=self.gen))
        captions = [self.rules.apply(i.caption, epoch, rng) for i in items]
        if self.text.cached:
            cond = Conditioning.join([self.cond_cache[c] for c in captions])
            if self.text.every_step:  # trained encoders (Flux's CLIP-L) beside the cached ones' outputs
                cond = self.objective.encode_text(captions, grad=True, cached=cond)
        else:
            cond = self.objective.encode_text(captions, grad=self.spec.train_text_encoder)
        return Batch(latents, cond, [ImageSize(i.size, i.bucket) for i in items])

    # ---- saving and resuming ----

    def _state_folder(self) -> Path:
        return self.out / state_folder(self.spec.output_name)

    def _save_state(self, epoch: int, step: int) -> None:
        tmp = self.out / state_folder(self.spec.output_name, ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(
            {k: v.contiguous() for k, v in lora_state(self.base).items()}, str(tmp / "lora.safetensors")
        )
        torch.save(
            {
                "epoch": epoch,
                "step": step,
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "generator": self.gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "settings": self._resume_key(),
                "metadata": self.metadata,
            },
            tmp / "train_state.pt",
        )
        final = self._state_folder()
        old = self.out / state_folder(self.spec.output_name, ".old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def _resume_key(self) -> dict[str, Any]:
        # What must match for a resumed run to be the same run.
        return self.spec.model_dump(
            exclude={
                "resume",
                "output_dir",
                "training_comment",
                "sample_prompts",
                "save_every_n_epochs",
                "sample_every_n_epochs",
                "sample_every_n_steps",
                "sample_at_first",
                *SPEED_SETTINGS,
            }
        )

    def _load_state(self) -> tuple[int, int]:
        state_dir = self._state_folder()
        if not (state_dir / "train_state.pt").exists():
            self.emit(StageEvent(stage="resume", message="no saved state found: starting from the beginning"))
            return 0, 0
        state = torch.load(state_dir / "train_state.pt", map_location=self.device, weights_only=False)
        if state["settings"] != self._resume_key():
            changed = sorted(k for k, v in self._resume_key().items() if state["settings"].get(k) != v)
            raise SpecError(f"cannot resume: settings changed since the saved state ({', '.join(changed)})")
        load_lora_state(self.base, load_file(str(state_dir / "lora.safetensors"), device=str(self.device)))
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.gen.set_state(state["generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        self.metadata = state["metadata"]
        self.emit(StageEvent(stage="resume", message=f"resuming after epoch {state['epoch']}"))
        return state["epoch"], state["step"]

    def _save_epoch(self, epoch: int, step: int, with_samples: bool) -> EpochEvent:
        spec = self.spec
        path = self.out / epoch_file(spec.output_name, epoch)
        tensors = kohya_state_dict(self.base, DTYPES[spec.save_precision])
        written = save_lora(path, tensors, self.metadata, epoch=epoch, steps=step)
        self._save_state(epoch, step)
        images, prompts = [], []
        if with_samples:
            images, prompts = self._samples(epoch, None, written["sshs_model_hash"][:12])
        return EpochEvent(
            epoch=epoch, step=step, lora_file=str(path), sample_images=images, sample_prompts=prompts
        )

    def _preview(self, epoch: int, step: int, end_of_epoch: bool) -> None:
        """Previews of weights that are not saved (kohya samples independently of saving)."""
        images, prompts = self._samples(epoch, None if end_of_epoch else step, None)
        self.emit(
            SamplesEvent(
                epoch=epoch,
                step=step,
                end_of_epoch=end_of_epoch,
                sample_images=images,
                sample_prompts=prompts,
            )
        )

    def _samples(self, epoch: int, step: int | None, lora_hash: str | None) -> tuple[list[str], list[str]]:
        """Render every sample prompt (named by ``step`` when given, else by ``epoch``); ``lora_hash``
        is the saved file's (None: the weights are in no file, so the PNG's text names no LoRA)."""
        spec = self.spec
        name = epoch_file(spec.output_name, epoch).removesuffix(".safetensors")
        if self.sampler is None:
            self.sampler = Sampler(
                self.base, device=self.device, dtype=self.autocast_dtype, clip_skip=spec.clip_skip
            )
        sample_dir = self.out / "sample"
        sample_dir.mkdir(exist_ok=True)
        paths = []
        # Previews draw from the global RNG nowhere that training reads it back: a run with
        # previews trains the same weights as one without, as kohya keeps it.
        # A compiled UNet runs previews uncompiled: their eval mode, no-grad and CFG batch would
        # each be graphs of their own, compiled for a handful of images.
        eager = torch.compiler.set_stance("force_eager") if spec.torch_compile else nullcontext()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), eager:
            for i, sp in enumerate(self.sample_prompts):
                self._check_cancel()
                self.emit(
                    StageEvent(
                        stage="sample",
                        message=f"sample {i + 1}/{len(self.sample_prompts)}",
                        current=i,
                        total=len(self.sample_prompts),
                    )
                )
                path = sample_dir / sample_file(spec.output_name, epoch, i, step)
                if lora_hash is None:
                    text = self.sampler.parameters_text(sp, self.base.name, self.base.model_hash)
                else:
                    # Written as A1111 would describe it, so the preview can be reproduced from its PNG alone.
                    described = replace(sp, prompt=f"{sp.prompt} <lora:{name}:1>")
                    text = self.sampler.parameters_text(
                        described,
                        self.base.name,
                        self.base.model_hash,
                        extra={"Lora hashes": f"{name}: {lora_hash}"},
                    )
                save_png(self.sampler.render(sp), path, text)
                paths.append(str(path))
        return paths, [sp.prompt for sp in self.sample_prompts]

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise Cancelled

    def _compile(self) -> None:
        """Build the compiled UNet's graphs for every batch shape of the run, before the first step.

        Buckets and the last, shorter batch of each give a run a few batch shapes, the same every
        epoch. Each is compiled here, forward and backward, on a real batch whose gradients are then
        dropped: steady-state steps only reuse graphs, and the compile time is reported on its own
        (the 'compile' stage's seconds) instead of hiding in the first steps' rate.
        """
        spec = self.spec
        shapes: dict[tuple[int, tuple[int, int]], list[tuple[ImageItem, bool]]] = {}
        for pairs in epoch_batches(self.dataset, spec.train_batch_size, 1, spec.seed, spec.flip_aug):
            shapes.setdefault((len(pairs), pairs[0][0].bucket), pairs)
        # One graph per shape must fit under dynamo's limit, or the later shapes would run eager.
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, len(shapes) + 1)
        self.emit(
            StageEvent(
                stage="compile",
                message=f"compiling for {len(shapes)} batch shapes ({spec.torch_compile_backend})",
            )
        )
        started = time.monotonic()
        gen_state = self.gen.get_state()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for pairs in shapes.values():
                self._check_cancel()
                batch = self._batch(pairs, 1, random.Random(0))
                # A generator of its own: the run's draws stay those of an uncompiled run.
                loss = self.objective.loss(batch, torch.Generator(self.device).manual_seed(0))
                loss.backward()
        self.gen.set_state(gen_state)
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = round(time.monotonic() - started, 2)
        self.emit(
            StageEvent(
                stage="compile",
                message=f"compiled for {len(shapes)} batch shapes in {seconds} s",
                current=len(shapes),
                total=len(shapes),
                seconds=seconds,
            )
        )

    def _report(self, loss: StepLoss) -> None:
        """The ProgressEvent of one optimizer step, or the job's failure if its loss is not finite."""
        value = loss.value()
        if not math.isfinite(value):
            raise JobFailed(
                f"the loss became NaN/inf at step {loss.step}: lower the learning rate, "
                "or use mixed_precision=bf16 instead of fp16"
            )
        self.loss_avg = value if self.loss_avg is None else 0.9 * self.loss_avg + 0.1 * value
        done = loss.step - self.step0
        rate = done / max(time.monotonic() - self.t0, 1e-6)
        spec = self.spec
        self.emit(
            ProgressEvent(
                step=loss.step,
                total_steps=self.total_steps,
                epoch=loss.epoch,
                total_epochs=self.num_epochs,
                loss=self.loss_avg,
                lr=loss.lr,
                eta_s=(self.total_steps - loss.step) / rate if rate else 0.0,
                samples_per_s=rate * spec.train_batch_size * spec.gradient_accumulation_steps,
            )
        )

    def _report_pending(self) -> None:
        """Report the step whose loss was left to read (``loss_one_step_late``), if any."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._report(pending)

    # ---- the loop ----

    def run(self) -> DoneEvent:
        started = time.monotonic()
        self._setup()
        spec = self.spec
        start_epoch, step = self._load_state() if spec.resume else (0, 0)
        for m in (self.base.unet, *self.base.text_encoders):
            # Only what holds trained LoRA runs in train mode (Flux's frozen T5 has dropout).
            m.train(any(p.requires_grad for p in m.parameters()))
        params = [p for g in self.groups for p in g["params"]]
        pattern = re.compile(re.escape(spec.output_name) + r"-\d{6}\.safetensors")
        epoch_files = sorted(str(p) for p in self.out.iterdir() if pattern.fullmatch(p.name))
        if spec.torch_compile:
            self._compile()
        self.loss_avg: float | None = None
        self.pending: StepLoss | None = None
        self.t0, self.step0 = time.monotonic(), step
        self.emit(
            StageEvent(
                stage="train",
                message=f"{self.num_epochs} epochs × {self.steps_per_epoch} steps: {self.total_steps} steps"
                if spec.max_train_epochs
                else f"{self.total_steps} steps ({self.num_epochs} epochs of {self.steps_per_epoch})",
                current=step,
                total=self.total_steps,
            )
        )
        if spec.sample_at_first and step == 0:
            self._preview(0, 0, end_of_epoch=False)
        sample_every = spec.sample_epochs_every()
        micro_losses: list[torch.Tensor] = []
        for epoch in range(start_epoch + 1, self.num_epochs + 1):
            # Reseeding per epoch makes an epoch's noise, order and captions independent of how
            # the run got there, so a resumed run is the same run. Each batch then draws from
            # self.gen in this order: the latent sample (only with cache_latents=false), then what
            # the objective's loss draws (for SD: noise, noise offset, pyramid octaves, timesteps).
            self.gen.manual_seed(spec.seed * 100_003 + epoch)
            rng = random.Random(spec.seed * 100_003 + epoch)
            batches = epoch_batches(self.dataset, spec.train_batch_size, epoch, spec.seed, spec.flip_aug)
            for i, pairs in enumerate(batches):
                self._check_cancel()
                batch = self._batch(pairs, epoch, rng)
                loss = self.objective.loss(batch, self.gen)
                micro_losses.append(loss.detach())
                self.scaler.scale(loss / spec.gradient_accumulation_steps).backward()
                if (i + 1) % spec.gradient_accumulation_steps and i + 1 != len(batches):
                    continue
                if spec.max_grad_norm > 0:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                # The step's loss: the mean of its micro-batches (the last step of an epoch may have fewer).
                step_loss = StepLoss(
                    torch.stack(micro_losses).mean(), step, epoch, self.lr_scheduler.get_last_lr()[0]
                )
                micro_losses.clear()
                # Reading a loss is the step's one wait for the GPU. Late, the step before this one
                # is read now that this one is queued; otherwise this one at once.
                self._report_pending()
                self.pending = step_loss
                if not spec.loss_one_step_late:
                    self._report_pending()
                if spec.sample_every_n_steps and step % spec.sample_every_n_steps == 0:
                    self._report_pending()
                    self._preview(epoch, step, end_of_epoch=False)
                if step >= self.total_steps:
                    break
            # Every step is reported before an epoch's files and previews, and the last before the end.
            self._report_pending()
            last = epoch == self.num_epochs or step >= self.total_steps
            sample = bool(sample_every) and (epoch % sample_every == 0 or last)
            if epoch % spec.save_every_n_epochs == 0 or last:
                event = self._save_epoch(epoch, step, sample)
                epoch_files = sorted({*epoch_files, event.lora_file})
                self.emit(event)
            elif sample:
                self._preview(epoch, step, end_of_epoch=True)
            if last:
                break
        final = self.out / f"{spec.output_name}.safetensors"
        final.unlink(missing_ok=True)
        try:
            os.link(epoch_files[-1], final)  # the last epoch's file under its final name, not a second copy
        except OSError:  # a file system without hard links
            shutil.copyfile(epoch_files[-1], final)
        return DoneEvent(
            lora_file=str(final),
            epoch_files=epoch_files,
            steps=step,
            seconds=round(time.monotonic() - started, 2),
        )


def _oom_advice(spec: TrainSpec) -> str:
    tips = []
    if spec.train_batch_size > 1:
        tips.append(f"train_batch_size (now {spec.train_batch_size})")
    if spec.resolution:
        tips.append(f"resolution (now {spec.resolution[0]}x{spec.resolution[1]}) or max_bucket_reso")
    if spec.network_dim > 16:
        tips.append(f"network_dim (now {spec.network_dim})")
    advice = "lower " + ", ".join(tips) if tips else "use a smaller base model"
    if not spec.gradient_checkpointing:
        advice += "; or set gradient_checkpointing=true"
    if spec.mixed_precision == "no":
        advice += "; or set mixed_precision=bf16"
    return advice


def train(
    spec: TrainSpec,
    emit: Emit,
    cancel: threading.Event | None = None,
    device: str | torch.device | None = None,
) -> DoneEvent | FailedEvent:
    """Run one training job; every outcome is an event, never an exception."""
    trainer = Trainer(spec, emit, cancel, device)
    return run_to_event(
        trainer.run,
        emit,
        bad_input=(SpecError, DatasetError, ModelError),
        cancelled="cancelled; epochs saved so far are kept",
        out_of_memory=lambda: _oom_advice(getattr(trainer, "spec", spec)),
    )
