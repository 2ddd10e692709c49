"""Every benchmark in one go, in order of importance, within a time budget; results as JSON.

    python -m bench.run_all --profile gpu --out "$OUT" --budget-s 540   # on the GPU machine
    python -m bench.run_all --profile cpu --out bench/results            # CPU figures, any machine
    python -m bench.run_all --profile tiny --out /tmp/x                  # the plumbing, in a minute

Each step runs as its own process (a crash or a timeout costs that step only; the GPU's memory
is clean for the next) and its JSON lines are collected, with the device's used-memory peak
polled around it, into ``OUT/results-PROFILE.json``; ``OUT/results-PROFILE.jsonl`` grows line by
line so a run cut short keeps what it measured; every step's stderr goes to ``OUT/log-PROFILE.txt``.
A step that cannot run (budget spent, reference code missing, a failure) leaves a record that says
why, so the table in docs/benchmarks.md always has its rows. The ``gpu`` profile starts with
``pytest -m gpu``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import VramPoll, log

ROOT = Path(__file__).parent.parent
REFS = Path(__file__).parent / "refs"


@dataclass
class Step:
    name: str
    argv: list[str]  # after `python`; a module run with -m, or pytest
    timeout: float
    tool: str = "loracord"
    metric: str = "train"
    needs: list[str] = field(default_factory=list)  # steps that must have succeeded first
    skip: str | None = None  # why it cannot run here, known before it starts


def _default(path: Path, fallback: str | None) -> str | None:
    return str(path) if path.exists() else fallback


def plan(args: argparse.Namespace) -> list[Step]:
    work = Path(args.work)
    p = PROFILES[args.profile]
    ref_py = args.ref_python or _default(REFS / "venv/bin/python", sys.executable)
    kohya_py = args.kohya_python or _default(REFS / "venv-kohya/bin/python", sys.executable)
    kohya_path = args.kohya_path or _default(Path("/tmp/site-kohya"), None)
    steps: list[Step] = []
    if args.profile == "gpu":
        steps.append(
            Step(
                "gpu tests",
                [
                    "-m",
                    "pytest",
                    "-m",
                    "gpu",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "tests/test_train.py",
                    "tests/test_gen.py",
                ],
                240,
                metric="tests",
            )
        )
        if args.only and any("flux" in o for o in args.only):
            # random:flux (17B parameters) needs a device call of its own: asked for by --only flux.
            # The test prints its peak VRAM and samples/s as one JSON line.
            steps.append(
                Step(
                    "flux fp8_base",
                    ["-m", "pytest", "-m", "gpu", "-s", "-q", "-p", "no:cacheprovider", "tests/test_flux.py"],
                    480,
                )
            )
    for fam in args.families:
        f = p["families"][fam]
        w = str(work / f"{args.profile}-{fam}")
        prep = f"prepare {fam}"
        steps.append(
            Step(
                prep,
                [
                    "-m",
                    "bench.prepare",
                    "--base",
                    f["base"],
                    "--work",
                    w,
                    "--images",
                    str(f["images"]),
                    "--repeats",
                    str(f["repeats"]),
                    *(["--resolution", str(f["resolution"])] if f.get("resolution") else []),
                ],
                f["prepare_timeout"],
                metric="prepare",
            )
        )
        common = [
            "--batch",
            str(f["batch"]),
            "--steps",
            str(f["steps"]),
            "--warmup",
            str(f["warmup"]),
            "--precision",
            p["precision"],
        ]
        steps.append(
            Step(
                f"loracord {fam}",
                ["-m", "bench.train_loracord", "--work", w, *common, *flops_args(fam)],
                f["train_timeout"],
                needs=[prep],
            )
        )
        for tool, py, extra in (
            ("diffusers", ref_py, []),
            ("kohya", kohya_py, ["--pythonpath", kohya_path] if kohya_path else []),
        ):
            skip = f.get(f"skip_{tool}")
            if not (REFS / "code").is_dir():
                skip = "bench/refs/code is missing: run bash bench/get_refs.sh (docs/benchmarks.md)"
            steps.append(
                Step(
                    f"{tool} {fam}",
                    [
                        "-m",
                        "bench.train_ref",
                        tool,
                        "--work",
                        w,
                        *common,
                        "--workers",
                        str(p["workers"]),
                        "--python",
                        py,
                        *extra,
                    ],
                    f["train_timeout"],
                    tool=tool,
                    needs=[prep],
                    skip=skip,
                )
            )
        steps.append(
            Step(
                f"gen {fam}",
                [
                    "-m",
                    "bench.gen",
                    "--work",
                    w,
                    "--steps",
                    str(p["gen_steps"]),
                    "--repeats",
                    str(p["gen_repeats"]),
                    *(["--size", str(f["gen_size"])] if f.get("gen_size") else []),
                ],
                f["gen_timeout"],
                metric="gen",
                needs=[prep],
            )
        )
    for fam in args.families:
        f = p["families"][fam]
        if "e2e_epochs" not in f:
            continue
        w = str(work / f"{args.profile}-{fam}")
        steps.append(
            Step(
                f"end to end {fam}",
                [
                    "-m",
                    "bench.train_loracord",
                    "--work",
                    w,
                    "--batch",
                    str(f["batch"]),
                    "--epochs",
                    str(f["e2e_epochs"]),
                    "--previews",
                    "--sample-steps",
                    str(p["gen_steps"]),
                    "--precision",
                    p["precision"],
                ],
                f["e2e_timeout"],
                needs=[f"prepare {fam}"],
            )
        )
    for fam in args.families:
        steps += speed_steps(fam, p, work / f"{args.profile}-{fam}")
    # Issue 17: loracord against the bare model, side by side in one process each.
    for kind in ("train", "gen"):
        metric = f"{kind}_overhead"
        command = ["-m", f"bench.{metric}", *p[metric], "--work", str(work)]
        steps.append(Step(f"{kind} overhead", command, p["overhead_timeout"], metric=metric))
    steps.append(Step("intake", ["-m", "bench.intake", *p["intake"]], 300, metric="intake"))
    steps.append(Step("caption florence2", ["-m", "bench.caption", *p["caption"]], 420, metric="caption"))
    for members in p["scheduler_members"]:
        steps.append(
            Step(
                f"scheduler {members}",
                ["-m", "bench.scheduler", "--members", str(members), "--jobs", str(p["scheduler_jobs"])],
                300,
                metric="scheduler",
            )
        )
    if p["discord_members"]:
        members = [str(m) for m in p["discord_members"]]
        steps.append(
            Step("discord ack", ["-m", "bench.discord_ack", "--members", *members], 300, metric="discord_ack")
        )
    if not args.refs:
        for s in steps:
            if s.tool != "loracord":
                s.skip = "references left out (--no-refs)"
    return [s for s in steps if not args.only or any(o in s.name for o in args.only)]


# Each speed setting on its own, then all together, against the `loracord FAM` step (all off): the
# gains table of docs/benchmarks.md. Only the gpu profile runs them (inductor on a CPU takes minutes
# a graph); `--only prepare speed` takes them in a device call of their own.
SPEED_RUNS = {
    "loss_one_step_late": "loss_one_step_late",
    "channels_last": "channels_last",
    "torch_compile": "torch_compile",
    "all": "loss_one_step_late,channels_last,torch_compile",
}


def flops_args(fam: str) -> list[str]:
    """bench/flops.py's count for this family and size, when one was taken (the MFU needs it)."""
    path = ROOT / "bench/results" / f"flops-{fam}.json"
    return ["--flops", str(path)] if path.exists() else []


def speed_steps(fam: str, p: dict[str, Any], work: Path) -> list[Step]:
    if not p.get("speed"):
        return []
    f = p["families"][fam]
    w = str(work)
    common = ["--batch", str(f["batch"]), "--steps", str(f["steps"]), "--warmup", str(f["warmup"])]
    common += ["--precision", p["precision"], *flops_args(fam)]
    steps = [
        Step(
            f"speed {fam} {label}",
            ["-m", "bench.train_loracord", "--work", w, *common, "--speed", flags],
            f["train_timeout"] + (300 if "compile" in flags else 0),
            needs=[f"prepare {fam}"],
        )
        for label, flags in SPEED_RUNS.items()
    ]
    gen = ["--steps", str(p["gen_steps"]), "--repeats", str(p["gen_repeats"]), "--compile", "inductor"]
    steps.append(
        Step(
            f"speed gen {fam} compiled",
            ["-m", "bench.gen", "--work", w, *gen],
            f["gen_timeout"] + 300,
            metric="gen",
            needs=[f"prepare {fam}"],
        )
    )
    return steps


_GPU_FAMILIES = {
    # The settings: SD1.5 512², batch 4; SDXL 1024², batch 2; the "standard" character LoRA is
    # 20 images × 10 repeats × 10 epochs with previews every epoch.
    "sd15": dict(
        base="random:sd15",
        images=20,
        repeats=10,
        batch=4,
        steps=60,
        warmup=15,
        e2e_epochs=10,
        prepare_timeout=240,
        train_timeout=300,
        gen_timeout=240,
        e2e_timeout=300,
    ),
    "sdxl": dict(
        base="random:sdxl",
        images=20,
        repeats=10,
        batch=2,
        steps=40,
        warmup=10,
        e2e_epochs=10,
        prepare_timeout=400,
        train_timeout=400,
        gen_timeout=300,
        e2e_timeout=600,
    ),
}
_KOHYA_TINY = (
    "kohya's UNet classes have SD1.5/SDXL sizes built in, so a tiny base cannot load (size mismatch)"
)
_TINY_FAMILIES = {
    fam: dict(
        base=f"tiny:{fam}",
        images=4,
        repeats=2,
        batch=2,
        steps=6,
        warmup=2,
        e2e_epochs=1,
        prepare_timeout=120,
        train_timeout=300,
        gen_timeout=200,
        e2e_timeout=200,
        skip_kohya=_KOHYA_TINY,
    )
    for fam in ("sd15", "sdxl")
}
PROFILES: dict[str, dict[str, Any]] = {
    "gpu": dict(
        families=_GPU_FAMILIES,
        precision="bf16",
        workers=4,
        gen_steps=20,
        gen_repeats=5,
        intake=["--images", "40"],
        caption=["--profile", "large", "--device", "cuda"],
        train_overhead=[
            "--bases",
            "random:sd15",
            "--batches",
            "4",
            "--size",
            "512",
            "--rounds",
            "3",
            "--steps",
            "20",
            "--warmup",
            "5",
        ],
        gen_overhead=["--bases", "random:sd15", "--size", "512", "--steps", "20", "--rounds", "5"],
        overhead_timeout=300,
        scheduler_members=[],  # the bot's figures come from the cpu profile (the GPU image has no sqlite-utils)
        discord_members=[],
        scheduler_jobs=400,
        speed=True,
    ),
    "cpu": dict(
        families={
            **_TINY_FAMILIES,
            # Full-size SD1.5 at 64² proves the references (kohya included) start from our files on a CPU.
            "sd15-full": dict(
                base="random:sd15",
                images=4,
                repeats=2,
                resolution=64,
                gen_size=256,  # the smallest /gen size for a full SD1.5
                batch=1,
                steps=6,
                warmup=2,
                prepare_timeout=300,
                train_timeout=900,
                gen_timeout=600,
            ),
        },
        precision="no",
        workers=0,
        gen_steps=4,
        gen_repeats=3,
        intake=["--images", "40"],
        caption=["--profile", "tiny", "--device", "cpu"],  # the large model takes ~40 s an image here
        train_overhead=[
            "--bases",
            "tiny:sd15",
            "random:sd15",
            "--batches",
            "1",
            "4",
            "--rounds",
            "3",
            "--steps",
            "3",
            "--warmup",
            "1",
        ],
        gen_overhead=["--bases", "tiny:sd15", "random:sd15", "--rounds", "3"],
        overhead_timeout=1800,
        scheduler_members=[50, 200],
        discord_members=[50, 200],
        scheduler_jobs=400,
    ),
    "tiny": dict(
        families=_TINY_FAMILIES,
        precision="no",
        workers=0,
        gen_steps=2,
        gen_repeats=1,
        intake=["--images", "3", "--size", "256x192"],
        caption=["--profile", "tiny", "--device", "cpu"],
        train_overhead=[
            "--bases",
            "tiny:sd15",
            "--batches",
            "1",
            "--rounds",
            "1",
            "--steps",
            "2",
            "--warmup",
            "1",
        ],
        gen_overhead=[
            "--bases",
            "tiny:sd15",
            "--rounds",
            "1",
            "--steps",
            "1",
            "--loras",
            "2",
            "--swaps",
            "2",
        ],
        overhead_timeout=300,
        scheduler_members=[5],
        discord_members=[5],
        scheduler_jobs=20,
    ),
}


def run_step(
    step: Step, deadline: float, done: set[str], planned: set[str], logf: Any
) -> list[dict[str, Any]]:
    base = {"tool": step.tool, "metric": step.metric, "step": step.name}
    # A step left out with --only is taken as done earlier (its files are in --work).
    missing = [n for n in step.needs if n in planned and n not in done]
    left = deadline - time.monotonic()
    why = step.skip or (f"needs {', '.join(missing)}, which did not succeed" if missing else None)
    if why is None and left < 10:
        why = "the run's time budget was spent before this step"
    if why:
        log(f"== {step.name}: skipped ({why})")
        return [{**base, "skipped": why}]
    log(f"== {step.name}: {' '.join(step.argv)}")
    logf.write(f"\n== {step.name}: {' '.join(step.argv)}\n")
    logf.flush()
    poll = VramPoll()
    started = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run(
            [sys.executable, *step.argv],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=logf,
            text=True,
            timeout=min(step.timeout, left),
            check=False,
        )
        out, code = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        code = "timeout"
    seconds = round(time.monotonic() - started, 2)
    peak = poll.stop()
    records = []
    for line in out.splitlines():
        if line.startswith("{"):
            records.append(
                {**base, **json.loads(line), "step": step.name, "step_s": seconds, "device_peak_mib": peak}
            )
    if step.metric == "tests":
        records = [
            {**base, "passed": code == 0, "summary": out.strip().splitlines()[-1:] or [""], "step_s": seconds}
        ]
    elif code != 0 or not records:
        records.append({**base, "error": f"exit {code} after {seconds} s; see the log", "step_s": seconds})
    else:
        done.add(step.name)
    if step.metric == "prepare" and code == 0:
        done.add(step.name)
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), required=True)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results")
    ap.add_argument("--work", type=Path, default=ROOT / "bench/out", help="prepared bases and data (large)")
    ap.add_argument("--budget-s", type=float, default=3600, help="stop starting steps after this")
    ap.add_argument("--families", nargs="+", default=None, help="default: all of the profile's")
    ap.add_argument("--only", nargs="+", default=None, help="steps whose name contains one of these")
    ap.add_argument("--no-refs", dest="refs", action="store_false", help="leave diffusers and kohya out")
    ap.add_argument("--ref-python", default=None, help="interpreter for diffusers' example")
    ap.add_argument("--kohya-python", default=None, help="interpreter for kohya")
    ap.add_argument("--kohya-path", default=None, help="kohya's own wheels, ahead of PYTHONPATH")
    args = ap.parse_args(argv)
    args.families = args.families or list(PROFILES[args.profile]["families"])
    deadline = time.monotonic() + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    done: set[str] = set()
    jsonl = args.out / f"results-{args.profile}.jsonl"
    with open(args.out / f"log-{args.profile}.txt", "w", encoding="utf-8") as logf, open(jsonl, "w") as lines:
        steps = plan(args)
        planned = {s.name for s in steps}
        for step in steps:
            for record in run_step(step, deadline, done, planned, logf):
                results.append(record)
                lines.write(json.dumps(record, ensure_ascii=False) + "\n")
                lines.flush()
    (args.out / f"results-{args.profile}.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    for r in results:
        figure = {
            k: r[k]
            for k in (
                "samples_per_s",
                "median_ratio",
                "seconds",
                "first_preview_s",
                "warm_s",
                "cold_s",
                "images_per_s_folder",
                "per_job_ms",
                "compile_s",
                "mfu",
                "recompiles",
                "passed",
                "skipped",
                "error",
            )
            if r.get(k) is not None
        }
        print(f"{r['step']:<22} {r['tool']:<10} {json.dumps(figure, ensure_ascii=False)[:150]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
