"""FLOPs of one LoRA training step, counted on the CPU at no device time, and the MFU they give.

The UNet is built from the shipped config on the meta device (no memory, no weights), given
loracord's LoRA (``runner.train.network.add_lora``, frozen base), and run forward + backward of
the training loss under ``torch.utils.flop_counter.FlopCounterMode``, which counts each matmul,
convolution and attention from shapes alone. The frozen weights get no gradient, so the backward
pass is the activations' gradients and the LoRA weights' only, as in training. Gradient
checkpointing's recomputed forward is left out: MFU counts the model's FLOPs, not the hardware's.

    python -m bench.flops --family sdxl --resolution 1024 --batch 1 --out bench/results/flops-sdxl.json

The MFU of a measured rate: ``mfu(flops_per_sample, samples_per_s)`` against the card's dense bf16
peak (H100 SXM and H200: 989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from runner.families.model import config
from runner.families.protocol import Base
from runner.spec import TrainSpec
from runner.train.network import add_lora

from .common import SHARED

PEAK_BF16_DENSE = {"H100": 989e12, "H200": 989e12}
LATENT_CHANNELS = 4
VAE_FACTOR = 8


def meta_unet(unet_config: dict[str, Any], family: str, rank: int = SHARED["network_dim"]) -> Base:
    """The UNet of ``unet_config`` on the meta device with loracord's LoRA of ``rank`` on it."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    unet.requires_grad_(False)
    base = Base("meta", family, unet, None, [], [], {}, 0)  # type: ignore[arg-type]  # no VAE needed
    spec = TrainSpec(
        output_name="flops",
        base="meta",
        train_data_dir=".",
        output_dir=".",
        network_dim=rank,
        network_alpha=rank,
        network_train_unet_only=True,
    )
    add_lora(base, spec)
    return base


def step_inputs(unet: Any, batch: int, resolution: int, tokens: int = 77) -> dict[str, Any]:
    """The UNet's inputs for one training batch at ``resolution``² (text encodings cached)."""
    side = resolution // VAE_FACTOR
    cfg = unet.config
    inputs: dict[str, Any] = {
        "sample": torch.empty(batch, cfg.in_channels, side, side, device="meta"),
        "timestep": torch.zeros(batch, dtype=torch.long, device="meta"),
        "encoder_hidden_states": torch.empty(batch, tokens, cfg.cross_attention_dim, device="meta"),
    }
    if cfg.addition_embed_type == "text_time":  # SDXL's pooled text and size conditioning
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.empty(batch, pooled, device="meta"),
            "time_ids": torch.empty(batch, 6, device="meta"),
        }
    return inputs


def count_step(unet: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """FLOPs of the loss's forward and backward through ``unet`` (an MSE against a target, as trained)."""
    counter = FlopCounterMode(display=False)
    with counter:
        out = unet(**inputs).sample
        forward = counter.get_total_flops()
        torch.nn.functional.mse_loss(out.float(), torch.empty_like(out, dtype=torch.float32)).backward()
    total = counter.get_total_flops()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return {
        "flops_per_step": total,
        "forward_flops": forward,
        "backward_flops": total - forward,
        "by_op": by_op,
        "by_module": {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()},
    }


def mfu(flops_per_sample: float, samples_per_s: float, peak: float = PEAK_BF16_DENSE["H100"]) -> float:
    """Model FLOPs utilisation: the FLOPs the measured rate does per second over the card's peak."""
    return flops_per_sample * samples_per_s / peak


def measure(family: str, resolution: int, batch: int, rank: int = SHARED["network_dim"]) -> dict[str, Any]:
    base = meta_unet(config(family, "unet"), family, rank)
    counts = count_step(base.unet, step_inputs(base.unet, batch, resolution))
    del counts["by_module"]  # hundreds of rows: the test reads them, the record does not need them
    return {
        "name": f"flops {family}",
        "family": family,
        "resolution": resolution,
        "batch": batch,
        "lora_rank": rank,
        **counts,
        "flops_per_sample": counts["flops_per_step"] / batch,
        "tflops_per_sample": round(counts["flops_per_step"] / batch / 1e12, 3),
        "peak_bf16_dense": PEAK_BF16_DENSE,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="sdxl", choices=["sd15", "sdxl"])
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=SHARED["network_dim"])
    p.add_argument("--out", type=Path, help="also write the record here")
    args = p.parse_args(argv)
    record = measure(args.family, args.resolution, args.batch, args.rank)
    text = json.dumps(record, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(json.dumps(record))
    print(f"{record['tflops_per_sample']} TFLOPs per sample", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
