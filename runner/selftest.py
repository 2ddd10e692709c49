"""`loracord selftest`: prove an install works, with no Discord, GPU or network."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

from .families.registry import lora_family
from .formats.kohya import read_lora
from .spec import DoneEvent, EpochEvent, TrainSpec


def make_demo_dataset(root: Path, count: int = 4, repeats: int = 2, size: tuple[int, int] = (64, 64)) -> Path:
    """A kohya-layout folder of simple drawn images with captions, for selftest and tests."""
    folder = root / f"{repeats}_demo"
    folder.mkdir(parents=True, exist_ok=True)
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    for i in range(count):
        w, h = size
        img = Image.new("RGB", size, (20 * i % 255, 40, 90))
        draw = ImageDraw.Draw(img)
        colour = colours[i % len(colours)]
        draw.ellipse([w // 4, h // 4, 3 * w // 4 - i, 3 * h // 4], fill=colour)
        img.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"{colour} circle, simple background, shape", encoding="utf-8")
    return root


def selftest(family: str = "sd15") -> int:
    started = time.monotonic()
    checks: list[tuple[str, bool]] = []

    def check(what: str, ok: bool) -> None:
        checks.append((what, ok))
        print(f"  [{'ok' if ok else 'FAIL'}] {what}")

    from .train.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        data = make_demo_dataset(Path(tmp) / "data")
        spec = TrainSpec.parse(
            {
                "base": f"tiny:{family}",
                "train_data_dir": str(data),
                "output_dir": str(Path(tmp) / "out"),
                "output_name": "selftest",
                "trigger_word": "sks",
                "max_train_epochs": 2,
                "network_dim": 4,
                "network_alpha": 2,
                "learning_rate": 1e-3,
                "sample_steps": 2,
                "mixed_precision": "no",
            }
        )
        print(f"training a tiny {family} LoRA for 2 epochs on the CPU…")
        events: list = []
        result = train(spec, events.append, device="cpu")
        check("training finished", isinstance(result, DoneEvent))
        if not isinstance(result, DoneEvent):
            print(f"  reason: {result.reason}")
            return 1
        epochs = [e for e in events if isinstance(e, EpochEvent)]
        check(
            "one LoRA file per epoch",
            [Path(e.lora_file).name for e in epochs]
            == ["selftest-000001.safetensors", "selftest-000002.safetensors"],
        )
        tensors, meta = read_lora(Path(result.lora_file))
        check(
            f"keys in the {family} LoRA format, the text encoders' included",
            lora_family(tensors, {}) == family and any(k.startswith("lora_te") for k in tensors),
        )
        alphas = {float(v) for k, v in tensors.items() if k.endswith(".alpha")}
        check("alpha holds network_alpha (2)", alphas == {2.0})
        check(
            "ss_* metadata (dim, alpha, epoch, hashes)",
            meta.get("ss_network_dim") == "4"
            and meta.get("ss_network_alpha") in ("2", "2.0")
            and meta.get("ss_epoch") == "2"
            and bool(meta.get("sshs_model_hash")),
        )
        trained = any(k.endswith("lora_up.weight") and v.abs().sum() > 0 for k, v in tensors.items())
        check("training moved the weights", trained)
        samples = [Path(p) for e in epochs for p in e.sample_images]
        check(
            "sample images with A1111 parameters",
            bool(samples) and all("Steps:" in Image.open(p).info.get("parameters", "") for p in samples),
        )
    ok = all(passed for _, passed in checks)
    print(f"selftest {'passed' if ok else 'FAILED'} in {time.monotonic() - started:.1f}s")
    return 0 if ok else 1
