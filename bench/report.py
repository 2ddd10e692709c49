"""Markdown tables from run_all's results, for docs/benchmarks.md.

python -m bench.report bench/results/results-cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _cell(v: Any) -> str:
    return "–" if v is None else str(v)


def _table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _peak(r: dict[str, Any]) -> str | None:
    parts = [r.get("peak_vram_mib"), r.get("peak_vram_mib_smi") or r.get("device_peak_mib")]
    return " / ".join(_cell(p) for p in parts) if any(parts) else None


def report(records: list[dict[str, Any]]) -> str:
    out = []
    first = next((r for r in records if "machine" in r), {})
    if first:
        out.append(
            f"Machine: `{json.dumps(first['machine'])}`; date {first['date']}; versions "
            f"`{json.dumps(first['versions'])}`."
        )
    train = [r for r in records if r.get("metric") == "train" and "samples_per_s" in r]
    ratio_base = {
        (r["step"].split()[-1], r["settings"].get("steps")): r["samples_per_s"]
        for r in train
        if r["tool"] == "loracord"
    }
    rows = []
    for r in train:
        s = r["settings"]
        mine = ratio_base.get((r["step"].split()[-1], s.get("steps")))
        ratio = round(mine / r["samples_per_s"], 2) if mine and r["tool"] != "loracord" else None
        rows.append(
            [
                r["step"],
                r["base"],
                f"{s['resolution']}² b{s['batch']} ×{s['steps']}",
                r["samples_per_s"],
                ratio,
                r["seconds"],
                r.get("first_step_s"),
                r.get("first_preview_s"),
                _peak(r),
            ]
        )
    out.append(
        _table(
            [
                "step",
                "base",
                "size, batch, steps",
                "samples/s",
                "loracord ÷ this",
                "total s",
                "first step s",
                "first preview s",
                "peak MiB (alloc / device)",
            ],
            rows,
        )
    )
    gen = [r for r in records if r.get("metric") == "gen" and "warm_s" in r]
    out.append(
        _table(
            [
                "/gen",
                "base",
                "size, steps",
                "cold s",
                "warm s",
                "new LoRA s",
                "swap s",
                "no LoRA s",
                "peak MiB",
            ],
            [
                [
                    r["step"],
                    r["base"],
                    f"{r['settings']['size']}², {r['settings']['steps']}",
                    r["cold_s"],
                    r["warm_s"],
                    r["new_lora_s"],
                    r["swap_s"],
                    r["no_lora_s"],
                    _peak(r),
                ]
                for r in gen
            ],
        )
    )
    intake = [r for r in records if r.get("metric") == "intake" and "images_per_s_zip" in r]
    sched = [r for r in records if r.get("metric") == "scheduler" and "per_job_ms" in r]
    out.append(
        _table(
            ["intake", "images", "images/s (files)", "images/s (zip)"],
            [
                [
                    r["step"],
                    f"{r['settings']['images']} × {r['settings']['size']}",
                    r["images_per_s_folder"],
                    r["images_per_s_zip"],
                ]
                for r in intake
            ],
        )
    )
    out.append(
        _table(
            [
                "scheduler",
                "jobs / members / workers",
                "ms per job",
                "dispatch p50 / p99 ms",
                "handle p50 / p99 ms",
                "job end → next start p50 ms",
            ],
            [
                [
                    r["step"],
                    f"{r['settings']['jobs']} / {r['settings']['members']} / {r['settings']['workers']}",
                    r["per_job_ms"],
                    f"{r['dispatch_ms_p50']} / {r['dispatch_ms_p99']}",
                    f"{r['handle_ms_p50']} / {r['handle_ms_p99']}",
                    r["end_to_start_ms_p50"],
                ]
                for r in sched
            ],
        )
    )
    caption = [r for r in records if r.get("metric") == "caption" and "captions_per_s" in r]
    if caption:
        out.append(
            _table(
                [
                    "captioning",
                    "model",
                    "batch",
                    "tokens × beams",
                    "captions/s",
                    "s/image",
                    "load s",
                    "peak MiB",
                ],
                [
                    [
                        r["step"],
                        f"{r['settings']['model']}, {r['settings']['dtype']}",
                        r["settings"]["batch"],
                        f"{r['settings']['new_tokens']} × {r['settings']['num_beams']}",
                        r["captions_per_s"],
                        r["s_per_image"],
                        r["load_s"],
                        _peak(r),
                    ]
                    for r in caption
                ],
            )
        )
    other = [r for r in records if "skipped" in r or "error" in r]
    out.append(
        _table(["not measured", "why"], [[r["step"], r.get("skipped") or r.get("error")] for r in other])
    )
    return "\n\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, nargs="+")
    args = p.parse_args(argv)
    records = [r for path in args.results for r in json.loads(path.read_text())]
    print(report(records), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
