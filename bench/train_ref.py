"""The reference trainers, run as their users run them, on the same base and data as loracord.

- ``diffusers``: ``examples/text_to_image/train_text_to_image_lora.py`` (``…_lora_sdxl.py`` for SDXL)
  from the diffusers repository, on the prepared diffusers folder and imagefolder.
- ``kohya``: sd-scripts' ``train_network.py`` (``sdxl_train_network.py``) on the prepared single-file
  checkpoint and kohya folder, with its fast settings (``--sdpa``, ``--cache_latents``, and for
  SDXL ``--cache_text_encoder_outputs``).

Their code is not ours to change: the rate is read off each program's own progress bar (tqdm's
``N/total`` on stderr), timed here as it arrives; the first ``--warmup`` steps are left out. Peak
VRAM is the device's used memory polled with nvidia-smi (the process's whole footprint, so the
same poll is taken around loracord in ``run_all``). Code and wheels live in ``bench/refs/``
(``bench/get_refs.sh``).

    python -m bench.train_ref kohya --work bench/out/sd15 --batch 4 --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from .common import SHARED, StepClock, VramPoll, emit, log, tqdm_steps
from .prepare import Prepared, load_prepared

REFS = Path(__file__).parent / "refs"
CODE = REFS / "code"
SCRIPTS = {
    ("diffusers", "sd15"): CODE / "diffusers/examples/text_to_image/train_text_to_image_lora.py",
    ("diffusers", "sdxl"): CODE / "diffusers/examples/text_to_image/train_text_to_image_lora_sdxl.py",
    ("kohya", "sd15"): CODE / "sd-scripts/train_network.py",
    ("kohya", "sdxl"): CODE / "sd-scripts/sdxl_train_network.py",
}


def diffusers_args(p: Prepared, args: argparse.Namespace, out: Path) -> list[str]:
    return [
        f"--pretrained_model_name_or_path={p.diffusers_dir}",
        f"--train_data_dir={p.hf_data}",
        "--image_column=image",
        "--caption_column=text",
        f"--resolution={p.resolution}",
        "--center_crop",
        f"--train_batch_size={args.batch}",
        f"--max_train_steps={args.steps}",
        f"--learning_rate={SHARED['learning_rate']}",
        "--lr_scheduler=constant",
        "--lr_warmup_steps=0",
        f"--rank={SHARED['network_dim']}",  # the example's alpha is its rank
        f"--max_grad_norm={SHARED['max_grad_norm']}",
        f"--mixed_precision={args.precision}",
        f"--dataloader_num_workers={args.workers}",
        "--checkpointing_steps=1000000",
        "--seed=42",
        f"--output_dir={out}",
        f"--cache_dir={out / 'hf-cache'}",
        *(["--gradient_checkpointing"] if args.gradient_checkpointing else []),
    ]


def kohya_args(p: Prepared, args: argparse.Namespace, out: Path) -> list[str]:
    return [
        f"--pretrained_model_name_or_path={p.single_file}",
        f"--tokenizer_cache_dir={p.tokenizer_cache}",
        f"--train_data_dir={p.kohya_data}",
        "--caption_extension=.txt",
        f"--resolution={p.resolution},{p.resolution}",
        f"--train_batch_size={args.batch}",
        f"--max_train_steps={args.steps}",
        "--network_module=networks.lora",
        f"--network_dim={SHARED['network_dim']}",
        f"--network_alpha={SHARED['network_alpha']}",
        "--network_train_unet_only",
        f"--learning_rate={SHARED['learning_rate']}",
        f"--unet_lr={SHARED['learning_rate']}",
        "--lr_scheduler=constant",
        "--optimizer_type=AdamW",
        f"--max_grad_norm={SHARED['max_grad_norm']}",
        f"--mixed_precision={args.precision}",
        "--save_precision=fp16",
        "--sdpa",
        "--cache_latents",
        *(["--cache_text_encoder_outputs"] if p.family == "sdxl" else []),
        f"--max_data_loader_n_workers={args.workers}",
        *(["--persistent_data_loader_workers"] if args.workers else []),
        "--save_model_as=safetensors",
        "--save_every_n_epochs=1000000",
        "--output_name=bench",
        f"--output_dir={out}",
        "--seed=42",
        *(["--gradient_checkpointing"] if args.gradient_checkpointing else []),
    ]


def child_versions(python: str, env: dict[str, str]) -> dict[str, str]:
    """The library versions the reference itself runs with (its interpreter, its PYTHONPATH)."""
    code = "import json, bench.common as c; print(json.dumps(c.versions()))"
    root = str(Path(__file__).parent.parent)
    env = dict(env, PYTHONPATH=os.pathsep.join([env.get("PYTHONPATH", ""), root]))
    out = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, check=False)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def run(args: argparse.Namespace) -> dict:
    prepared = load_prepared(args.work)
    script = SCRIPTS[(args.tool, prepared.family)]
    if not script.exists():
        raise SystemExit(f"{script} is missing: run bash bench/get_refs.sh first (docs/benchmarks.md)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONUNBUFFERED"] = "1"
    if args.pythonpath:  # the reference's own library versions ahead of ours (kohya on the GPU machine)
        env["PYTHONPATH"] = os.pathsep.join([args.pythonpath, env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory(prefix=f"{args.tool}-bench-") as tmp:
        out = Path(tmp)
        env["HF_HOME"] = str(out / "hf-home")
        make = diffusers_args if args.tool == "diffusers" else kohya_args
        python = os.path.abspath(args.python) if os.sep in args.python else args.python
        cmd = [python, script.name, *make(prepared, args, out)]
        log(f"{args.tool}: {' '.join(cmd)}")
        clock = StepClock(warmup=args.warmup)
        tail: deque[str] = deque(maxlen=40)
        poll = VramPoll()
        started = time.monotonic()
        proc = subprocess.Popen(
            cmd, cwd=script.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        assert proc.stderr is not None
        first_step = None
        for text, step in tqdm_steps(proc.stderr):
            if step is None:
                if text.strip():
                    tail.append(text)
                continue
            if step > 0 and first_step is None:
                first_step = time.monotonic() - started
            clock.step(step)
        code = proc.wait()
        total = time.monotonic() - started
        peak = poll.stop()
        versions = child_versions(python, env)
    if code != 0 or clock.last < args.steps:
        log("\n".join(tail))
        raise SystemExit(f"{args.tool} exited with {code} after {clock.last}/{args.steps} steps")
    rate = clock.steps_per_s()
    return emit(
        args.tool,
        "train",
        base=prepared.base,
        family=prepared.family,
        script=str(script.relative_to(CODE)),
        reference_versions=versions,
        commit=(CODE / script.relative_to(CODE).parts[0] / "COMMIT").read_text().strip(),
        command=" ".join(cmd[1:]),
        settings={
            "resolution": prepared.resolution,
            "batch": args.batch,
            "steps": args.steps,
            "precision": args.precision,
            "gradient_checkpointing": args.gradient_checkpointing,
            "warmup_steps_excluded": args.warmup,
        },
        samples_per_s=None if rate is None else round(rate * args.batch, 3),
        seconds=round(total, 2),
        first_step_s=None if first_step is None else round(first_step, 2),
        peak_vram_mib_smi=peak,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tool", choices=["diffusers", "kohya"])
    p.add_argument("--work", type=Path, required=True, help="a folder made by bench.prepare")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--precision", default="bf16", choices=["no", "fp16", "bf16"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--workers", type=int, default=4, help="data loader processes")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the steady-state rate")
    p.add_argument("--python", default=sys.executable, help="the interpreter that runs the reference")
    p.add_argument("--pythonpath", default=None, help="put ahead of PYTHONPATH (the reference's own wheels)")
    return p


def main(argv: list[str] | None = None) -> int:
    run(parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
