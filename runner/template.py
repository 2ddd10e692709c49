"""The template CPU workers are forked from.

torch, diffusers, transformers and peft take about ten seconds to import on a small CPU. The bot
starts one template process (``bot/dispatch/local.py``), which imports what a worker needs once
(``runner/warm.py``) and then forks a CPU worker whenever the bot asks: a worker, first or started
again after it died, is ready at once. The template is the workers' parent, so it tells the bot
how each one ended. GPU workers are not forked: CUDA does not survive a fork once the parent has
touched it, and importing bitsandbytes (through diffusers) does.

The bot and the template speak over a ``multiprocessing`` connection: the bot sends
``(stdin, stdout, log_path, env, device)`` (the first two are the worker's ends of two pipes, as
connections) and hears ``("started", pid)`` for each, in order, and ``("ended", pid, code)`` when
a worker exits (``code`` negative for a signal, as ``subprocess`` gives it).
"""

from __future__ import annotations

import ctypes
import fcntl
import multiprocessing
import os
import runpy
import signal
import sys
from multiprocessing.connection import Connection, wait


def die_with_parent() -> None:
    """SIGTERM (cancel, then exit) when the parent process goes, even killed with -9: an orphan
    must never train on beside the job the next bot resumes."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def threads_from_env() -> None:
    """torch's thread count from this process's OMP_NUM_THREADS: OpenMP read the template's
    environment when torch loaded there."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        import torch  # loaded already: the template imported it

        torch.set_num_threads(int(threads))


def serve(requests: Connection) -> None:
    """The template's life: import, then fork workers until the connection ends, which it does when
    the bot exits, even killed with -9. (Not PR_SET_PDEATHSIG: that follows the thread that started
    the template, and the bot starts it from a thread that ends.)"""
    from . import warm  # noqa: F401 (imported for the workers forked below)

    fork = multiprocessing.get_context("fork")
    children: dict[int, multiprocessing.process.BaseProcess] = {}  # sentinel -> worker
    while True:
        for ready in wait([requests, *children]):
            if ready is requests:
                try:
                    stdin, stdout, log_path, env, device = requests.recv()
                except EOFError:
                    return  # the bot is gone; the workers get SIGTERM as the template exits
                # Plain descriptors above 0-2 (which the worker's own become), nothing to close them later.
                ends = [fcntl.fcntl(end.fileno(), fcntl.F_DUPFD, 3) for end in (stdin, stdout)]
                stdin.close(), stdout.close()
                worker = fork.Process(target=_worker, args=(*ends, log_path, env, device, requests.fileno()))
                worker.start()
                for end in ends:
                    os.close(end)
                children[worker.sentinel] = worker
                requests.send(("started", worker.pid))
            else:
                worker = children.pop(ready)
                worker.join()
                requests.send(("ended", worker.pid, worker.exitcode))


def _worker(stdin: int, stdout: int, log_path: str, env: dict[str, str], device: str, bot: int) -> None:
    """A worker's body in the forked process: ``runner.worker``'s main on the pipes, log and
    environment the bot gave it, as an exec'd worker has them."""
    log_fd = fcntl.fcntl(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644), fcntl.F_DUPFD, 3)
    for std, fd in enumerate((stdin, stdout, log_fd)):
        os.dup2(fd, std)
    # The originals, and the template's connection to the bot: the bot hears of the template's
    # end from the connection, which a worker's copy would keep open. (Not everything above 2:
    # multiprocessing's sentinel pipe tells the template when this process ends.)
    for fd in (stdin, stdout, log_fd, bot):
        os.close(fd)
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115 (they live as long as the process)
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.clear()
    os.environ.update(env)
    threads_from_env()
    die_with_parent()
    sys.argv = ["runner.worker", device]
    runpy.run_module("runner.worker", run_name="__main__", alter_sys=True)
