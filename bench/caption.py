"""Captions per second with Florence-2 through ``runner.data.captioner.caption_dataset`` (what a worker
runs for a ``CaptionSpec``), on Florence-2-large's real architecture with random weights.

The model is built here from ``bench/florence2_large.json`` (no download), with an offline tokenizer
and image processor, and saved to a temporary folder that the job loads as any captioner folder.
Random weights would stop a caption at any token, so the folder's generation config sets
``min_new_tokens`` to the job's ``max_new_tokens``: every caption is exactly ``--tokens`` tokens
long (beam search included), the length of a typical detailed caption. One record per batch size:
steady-state captions/s (the first batch, with its warm-up, left out), seconds per image, the job's
total (model load included), the allocator's peak VRAM, and the model's load time on its own.

    python -m bench.caption                                  # large, on the GPU
    python -m bench.caption --profile tiny --device cpu      # a tiny model: the plumbing, in seconds
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from runner.data.captioner import Captioner, caption_dataset
from runner.spec import CaptionedEvent, CaptionSpec, StageEvent

from .common import emit, log, peak_vram_mib, reset_peak
from .data import make_image

CONFIG = Path(__file__).with_name("florence2_large.json")
TINY = {
    "vision_config": dict(
        model_type="florence_vision", depths=[1], embed_dim=[16], num_heads=[1], num_groups=[1], patch_size=[7],
        patch_stride=[4], patch_padding=[3], patch_prenorm=[False], window_size=12, projection_dim=32,
    ),
    "text_config": dict(
        model_type="bart", vocab_size=512, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=128, bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
    ),
    "_image_size": 16,
    "_image_seq_length": 17,  # (16 / patch stride 4)² patches + the pooled one
}  # fmt: skip
PROFILES = {
    "large": dict(images=48, batches=[1, 8, 16], tokens=64, image_size="1024x768"),
    "tiny": dict(images=8, batches=[1, 4], tokens=8, image_size="64x48"),
}


def build_model(folder: Path, profile: str, tokens: int) -> Path:
    """Florence-2 with random weights in transformers' format, as ``resolve_captioner`` accepts it."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        GenerationConfig,
        RobertaTokenizer,
    )

    spec = json.loads(CONFIG.read_text()) if profile == "large" else TINY
    text = spec["text_config"]
    # The tokenizer is made up (one word per id, no merges): it has the real vocabulary's size so that
    # every id a random model picks decodes to a word, as a real caption's do. Its pieces differ from
    # BART's, which changes nothing timed here: the prompt is one task token and the image's tokens.
    words = [f"Ġw{i}" for i in range(text["vocab_size"] - 5)]
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *words, "<image>"])}
    tokenizer = RobertaTokenizer(vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"})
    side = spec["_image_size"]
    # Florence-2's image processor: a plain resize to a square (no crop), ImageNet mean and std.
    images = CLIPImageProcessorPil(
        size={"height": side, "width": side},
        do_center_crop=False,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    images.image_seq_length = spec["_image_seq_length"]
    config = Florence2Config(
        vision_config=spec["vision_config"],
        text_config=text,
        image_token_id=vocab["<image>"],
    )
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=text["decoder_start_token_id"],
        bos_token_id=text["bos_token_id"],
        eos_token_id=text["eos_token_id"],
        pad_token_id=text["pad_token_id"],
        min_new_tokens=tokens,  # the job passes max_new_tokens=tokens: fixed-length captions
    )
    folder.mkdir(parents=True, exist_ok=True)
    # Saved in half precision, as the published checkpoint is (the job casts to its own dtype).
    model.to(torch.float16).save_pretrained(folder)
    Florence2Processor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def images_for(root: Path, count: int, size: tuple[int, int]) -> Path:
    folder = root / "10_zzk"
    folder.mkdir(parents=True)
    for i in range(count):
        make_image(2000 + i, size)[0].save(folder / f"{i:04d}.jpg", quality=90)
    return root


def timed_job(spec: CaptionSpec, device: str) -> dict[str, Any]:
    """One caption job; the rate is taken between its first and last progress events."""
    seen: list[tuple[float, int]] = []

    def on_event(event: Any) -> None:
        if isinstance(event, StageEvent) and event.stage == "captioning" and event.current is not None:
            seen.append((time.monotonic(), event.current))

    reset_peak()
    started = time.monotonic()
    final = caption_dataset(spec, on_event, device=device)
    total = time.monotonic() - started
    if not isinstance(final, CaptionedEvent):
        raise SystemExit(f"the caption job failed: {final}")
    (t0, n0), (t1, n1) = seen[0], seen[-1]
    rate = (n1 - n0) / (t1 - t0) if n1 > n0 and t1 > t0 else None
    words = [len(c.split()) for _, c in final.examples]
    return {
        "captions_per_s": round(rate, 3) if rate else None,
        "s_per_image": round(1 / rate, 4) if rate else None,
        "total_s": round(total, 2),
        "captions": final.images,
        "captions_written": final.captions_written,
        "words_per_caption": round(sum(words) / len(words), 1) if words else 0,
        "example": final.examples[0][1] if final.examples else "",
        "peak_vram_mib": peak_vram_mib(),
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    p = PROFILES[args.profile]
    count = args.images or p["images"]
    batches = args.batch or p["batches"]
    tokens = args.tokens or p["tokens"]
    w, h = (int(v) for v in (args.size or p["image_size"]).lower().split("x"))
    records = []
    with tempfile.TemporaryDirectory(prefix="loracord-captionbench-") as tmp:
        root = Path(tmp)
        started = time.monotonic()
        folder = build_model(root / "model", args.profile, tokens)
        log(f"built Florence-2 ({args.profile}) in {time.monotonic() - started:.1f} s")
        data = images_for(root / "data", count, (w, h))
        # The model's load on its own (from the folder just written, so from the OS's file cache).
        started = time.monotonic()
        captioner = Captioner(folder, args.device)
        load_s = time.monotonic() - started
        params = sum(t.numel() for t in captioner.model.parameters())
        dtype = str(captioner.dtype).removeprefix("torch.")
        captioner.close()
        for batch in batches:
            spec = CaptionSpec(
                train_data_dir=str(data),
                captioner=str(folder),
                batch_size=batch,
                num_beams=args.beams,
                max_new_tokens=tokens,
            )
            log(f"captioning {count} images, batch {batch}")
            figures = timed_job(spec, args.device)
            records.append(
                emit(
                    "loracord",
                    "caption",
                    settings={
                        "model": f"florence2-{args.profile} (random weights)",
                        "parameters_m": round(params / 1e6, 1),
                        "images": count,
                        "image_size": f"{w}x{h}",
                        "batch": batch,
                        "new_tokens": tokens,
                        "num_beams": args.beams,
                        "task": spec.task,
                        "device": args.device,
                        "dtype": dtype,
                    },
                    load_s=round(load_s, 2),
                    **figures,
                )
            )
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="large")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=int, default=None, help="default: the profile's")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes; default: the profile's")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per caption (fixed)")
    ap.add_argument("--beams", type=int, default=CaptionSpec.model_fields["num_beams"].default)
    ap.add_argument("--size", default=None, help="WxH of the generated images")
    run(ap.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
