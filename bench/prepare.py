"""One base and one data set, written once in every form the trainers read.

``python -m bench.prepare --base random:sd15 --work bench/out/sd15`` writes::

    WORK/base/sd15/                       the weights as a diffusers folder (diffusers' example, loracord)
    WORK/base/model.safetensors           the same weights in A1111's single-file layout (kohya, loracord)
    WORK/base/tokenizers/                 the CLIP tokenizers where kohya's --tokenizer_cache_dir looks
    WORK/data/kohya/N_sks/                images + .txt captions (kohya, loracord)
    WORK/data/hf/                         the same files as an imagefolder with metadata.jsonl (diffusers)
    WORK/prepared.json                    these paths; a second run with the same settings reuses them

so every trainer starts from identical weights and data. ``WORK/base`` doubles as the config root
(``runner.families.registry.load_base(..., config_root=...)``) for a single file of a tiny model.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .common import log
from .data import hf_imagefolder, kohya_dataset

# Where kohya's tokenizer loaders look under --tokenizer_cache_dir (the hub ids, "/" → "_").
KOHYA_TOKENIZERS = ("openai_clip-vit-large-patch14", "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k")


@dataclass
class Prepared:
    base: str  # the name it was made from
    family: str
    resolution: int
    diffusers_dir: str
    single_file: str
    config_root: str
    tokenizer_cache: str
    kohya_data: str
    hf_data: str
    images: int
    repeats: int


def save_slow_tokenizer(tok, folder: Path) -> None:
    """The tokenizer with ``vocab.json`` and ``merges.txt`` beside ``tokenizer.json``: kohya's pinned
    transformers 4 builds the slow CLIPTokenizer, which reads those two, and transformers 5 writes
    only the fast form."""
    tok.save_pretrained(folder)
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def prepare(base_name: str, work: Path, images: int, repeats: int, resolution: int | None = None) -> Prepared:
    work = work.resolve()
    stamp = work / "prepared.json"
    wanted = {"base": base_name, "images": images, "repeats": repeats}
    if stamp.exists():
        old = Prepared(**json.loads(stamp.read_text()))
        if {k: getattr(old, k) for k in wanted} == wanted and resolution in (None, old.resolution):
            log(f"prepare: reusing {work}")
            return old
    # Imported here: the reference harness reads prepared.json without loading torch and diffusers.
    import torch
    from safetensors.torch import save_file

    from runner.families.registry import base_to_ldm, load_base, save_pipeline

    base = load_base(base_name)
    res = resolution or base.native_resolution
    root = work / "base"
    folder = root / base.family
    log(f"prepare: {base_name} → {root}")
    # Half precision on disk, as checkpoints are shipped; every trainer reads these same values.
    base.to("cpu", torch.float16)
    save_pipeline(base, folder)
    save_file(base_to_ldm(base), str(root / "model.safetensors"))
    for tok, name in zip(base.tokenizers, KOHYA_TOKENIZERS, strict=False):
        save_slow_tokenizer(tok, root / "tokenizers" / name)
    del base
    kohya = kohya_dataset(work / "data" / "kohya", images, repeats, (res, res))
    hf = hf_imagefolder(kohya, work / "data" / "hf")
    prepared = Prepared(
        base=base_name,
        family=folder.name,
        resolution=res,
        diffusers_dir=str(folder),
        single_file=str(root / "model.safetensors"),
        config_root=str(root),
        tokenizer_cache=str(root / "tokenizers"),
        kohya_data=str(kohya),
        hf_data=str(hf),
        images=images,
        repeats=repeats,
    )
    stamp.write_text(json.dumps(asdict(prepared), indent=1))
    return prepared


def load_prepared(work: Path) -> Prepared:
    return Prepared(**json.loads((work / "prepared.json").read_text()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="tiny:sd15, random:sdxl, …")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--resolution", type=int, default=None, help="image side; default the base's native size")
    args = p.parse_args(argv)
    prepared = prepare(args.base, args.work, args.images, args.repeats, args.resolution)
    print(json.dumps(asdict(prepared)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
