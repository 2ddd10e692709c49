"""The worker in-process: a short job served between training steps has its own cancel."""

from __future__ import annotations

import threading
import time

from runner.selftest import make_demo_dataset
from runner.spec import FailedEvent, ImagesEvent, ProgressEvent
from runner.worker import Worker


def test_cancelling_training_does_not_cancel_a_gen_served_between_its_steps(tmp_path):
    data = make_demo_dataset(tmp_path / "data", count=2, repeats=1)
    worker = Worker("cpu")
    train_spec = {
        "base": "tiny:sd15",
        "train_data_dir": str(data),
        "output_dir": str(tmp_path / "out"),
        "output_name": "w",
        "max_train_epochs": 20,
        "sample_every_n_epochs": 0,
        "network_dim": 4,
    }
    gen_job = {
        "type": "gen",
        "id": "g",
        "spec": {
            "prompt": "a red circle",
            "base": "tiny:sd15",
            "steps": 2,
            "output_dir": str(tmp_path / "gen"),
        },
    }
    results: dict[str, object] = {}
    gen_thread = threading.Thread(target=lambda: results.update(gen=worker.run(gen_job, lambda e: None)))

    def on_train_event(event):
        if isinstance(event, ProgressEvent) and event.step == 1:
            gen_thread.start()  # it waits for the trainer's next pause between steps
            deadline = time.monotonic() + 30
            while not worker._waiting and time.monotonic() < deadline:
                time.sleep(0.01)
            worker.cancel("t")  # the member cancels the training job while the gen is waiting

    results["train"] = worker.run({"type": "train", "id": "t", "spec": train_spec}, on_train_event)
    gen_thread.join(timeout=120)
    assert isinstance(results["train"], FailedEvent) and results["train"].kind == "cancelled"
    assert isinstance(results["gen"], ImagesEvent), results["gen"]
