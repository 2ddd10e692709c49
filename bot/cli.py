"""The `loracord` command.

The GPU-side subcommands are runner/'s own CLI, imported only when one of them is asked for,
so the bot process itself never loads torch.
"""

from __future__ import annotations

import os
import sys

RUNNER_COMMANDS = ("train", "dataset", "tag", "caption", "gen", "grid", "selftest")
OPS_COMMANDS = ("run", "jobs", "quota", "web-link")


def main(argv: list[str] | None = None) -> int:
    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        # `loracord … | head` closed the pipe: not worth a traceback. Python's documented recipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in RUNNER_COMMANDS:
        from runner.cli import main as runner_main

        return runner_main(argv)
    if argv and argv[0] in OPS_COMMANDS:
        from .ops_cli import main as ops_main

        return ops_main(argv)
    print(
        "usage: loracord {run,jobs,quota,web-link,train,dataset,tag,caption,gen,grid,selftest} ...\n\n"
        "  run       the bot: queue, scheduler and GPU workers (--no-discord: without Discord)\n"
        "  jobs      submit, list, show and cancel jobs (loracord jobs --help)\n"
        "  quota     show and set members' and roles' quotas\n"
        "  web-link  a sign-in link to the web pages (--admin: the server's page)\n"
        "  train     train a LoRA from a folder of images (loracord train --help)\n"
        "  dataset   turn images, folders and zips into a clean, numbered training folder with a report\n"
        "  tag       caption a training folder with a WD14 tagger (trigger word, tag removal, frequencies)\n"
        "  caption   caption a training folder in sentences with Florence-2 (trigger word, word limit)\n"
        "  gen       generate images with LoRAs: <lora:NAME:0.8> in the prompt (loracord gen --help)\n"
        "  grid      one image of a LoRA's epochs × weights, to pick the best (loracord grid --help)\n"
        "  selftest  prove this install works: trains a tiny LoRA on the CPU, no GPU or network needed",
        file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout,
    )
    return 0 if argv and argv[0] in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
