"""Speed settings change how fast a run goes, never what it trains: each against the plain run.

torch.compile runs here with the ``eager`` and ``aot_eager`` backends: they trace and guard as
inductor does (so graphs and recompiles count the same) without inductor's C++ build, which
takes minutes per graph on this CPU. Inductor itself is measured by bench/run_gpu.sh.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import settings_for
from torch._dynamo.utils import counters

from runner.selftest import make_demo_dataset
from runner.spec import DoneEvent, FailedEvent, ProgressEvent, StageEvent, TrainSpec
from runner.train.loop import Trainer, train


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("data"), count=4, repeats=1)


@pytest.fixture(scope="module")
def two_buckets(tmp_path_factory) -> Path:
    """Two square and two wide images: two buckets, so two batch shapes at batch size 2."""
    root = make_demo_dataset(tmp_path_factory.mktemp("buckets"), count=2, repeats=1)
    wide = make_demo_dataset(tmp_path_factory.mktemp("wide"), count=2, repeats=1, size=(96, 64))
    shutil.move(wide / "1_demo", root / "1_wide")
    return root


def spec_for(out: Path, data: Path, **settings) -> TrainSpec:
    return settings_for(out, data, network_train_unet_only=True, **settings)


def run(out: Path, data: Path, on_event=None, **settings):
    events: list = []

    def emit(e):
        events.append(e)
        if on_event:
            on_event(e)

    result = train(spec_for(out, data, **settings), emit, device="cpu")
    assert isinstance(result, DoneEvent), result
    return events, load_file(result.lora_file)


def losses(events) -> list[tuple[int, float]]:
    return [(e.step, e.loss) for e in events if isinstance(e, ProgressEvent)]


def close(a: dict, b: dict, tol: float) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=tol, atol=tol) for k in a)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, data):
    return run(tmp_path_factory.mktemp("plain"), data)


# ---- the loss read one step late ----


def test_loss_one_step_late_reports_the_same_losses_and_trains_the_same_weights(tmp_path, data, plain):
    events, tensors = run(tmp_path, data, loss_one_step_late=True)
    assert losses(events) == losses(plain[0])
    assert [s for s, _ in losses(events)] == [1, 2, 3, 4]  # the last step's loss too
    assert tensors.keys() == plain[1].keys() and all(torch.equal(tensors[k], plain[1][k]) for k in tensors)


def test_loss_one_step_late_still_reports_every_step_before_its_epoch_files(tmp_path, data):
    events, _ = run(tmp_path, data, loss_one_step_late=True, max_train_epochs=2)
    kinds = [(e.type, getattr(e, "step", None)) for e in events if e.type in ("progress", "epoch")]
    assert kinds == [*(("progress", s) for s in range(1, 5)), ("epoch", 4)] + [
        *(("progress", s) for s in range(5, 9)),
        ("epoch", 8),
    ]


@pytest.mark.parametrize(("late", "bad_step"), [(False, 3), (True, 3), (True, 4)])
def test_a_nan_loss_fails_the_job_at_its_own_step(tmp_path, data, monkeypatch, late, bad_step):
    # The batch of step bad_step (batch size 1: one batch a step) gets NaN latents.
    real_batch = Trainer._batch
    calls = []

    def poisoned(self, pairs, epoch, rng):
        batch = real_batch(self, pairs, epoch, rng)
        calls.append(1)
        if len(calls) == bad_step:
            batch.latents = torch.full_like(batch.latents, float("nan"))
        return batch

    monkeypatch.setattr(Trainer, "_batch", poisoned)
    events: list = []
    result = train(spec_for(tmp_path, data, loss_one_step_late=late), events.append, device="cpu")
    assert isinstance(result, FailedEvent)
    assert f"NaN/inf at step {bad_step}:" in result.reason
    assert [s for s, _ in losses(events)] == list(range(1, bad_step))
    assert not list(tmp_path.glob("t-*.safetensors"))  # no epoch saved with NaN weights


# ---- channels_last ----


def test_channels_last_trains_the_same_weights(tmp_path, data, plain):
    events, tensors = run(tmp_path, data, channels_last=True)
    # Other convolution kernels: the same sums in another order, so equal to fp32 rounding.
    assert close(tensors, plain[1], 1e-4)
    assert [s for s, _ in losses(events)] == [s for s, _ in losses(plain[0])]
    assert all(abs(a[1] - b[1]) < 1e-4 for a, b in zip(losses(events), losses(plain[0]), strict=True))


def test_channels_last_is_refused_for_a_transformer(tmp_path, data):
    spec = spec_for(tmp_path, data, base="tiny:flux", mixed_precision="bf16", channels_last=True)
    result = train(spec, lambda e: None, device="cpu")
    assert isinstance(result, FailedEvent) and result.kind == "bad_input"
    assert "channels_last: Flux's transformer works on token sequences" in result.reason


# ---- torch.compile ----


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def compiled_run(out: Path, data: Path, **settings):
    """A compiled run, with the graphs built before its compile stage ended and after it."""
    torch._dynamo.reset()
    counters.clear()
    seen: dict[str, int] = {}

    def on_event(e):
        if isinstance(e, StageEvent) and e.stage == "compile" and e.seconds is not None:
            seen["after_compile"] = graphs()

    events, tensors = run(out, data, on_event=on_event, torch_compile=True, **settings)
    return events, tensors, seen["after_compile"], graphs()


BUCKETS = dict(train_batch_size=2, max_train_epochs=2)


@pytest.fixture(scope="module")
def eager_buckets(tmp_path_factory, two_buckets):
    return run(tmp_path_factory.mktemp("eager"), two_buckets, **BUCKETS)


@pytest.fixture(scope="module")
def static_graphs(tmp_path_factory, two_buckets, eager_buckets):
    """One compiled run over two buckets (two batch shapes) for two epochs: (graphs built, events)."""
    out = tmp_path_factory.mktemp("static")
    events, tensors, at_compile, at_end = compiled_run(
        out, two_buckets, torch_compile_backend="aot_eager", **BUCKETS
    )
    # AOTAutograd's decompositions round differently from eager kernels: fp32 tolerance.
    assert close(tensors, eager_buckets[1], 1e-4)
    return at_compile, at_end, events


def test_a_compiled_run_trains_the_same_weights_builds_every_graph_first_and_reports_its_compile_time(
    static_graphs, eager_buckets
):
    at_compile, at_end, events = static_graphs
    assert at_compile >= 1 and at_end == at_compile, "a step recompiled"
    done = [e for e in events if isinstance(e, StageEvent) and e.stage == "compile" and e.seconds]
    assert len(done) == 1 and done[0].seconds > 0 and done[0].total == 2  # two buckets: two batch shapes
    assert [s for s, _ in losses(events)] == [s for s, _ in losses(eager_buckets[0])] == [1, 2, 3, 4]
    assert all(abs(a[1] - b[1]) < 1e-4 for a, b in zip(losses(events), losses(eager_buckets[0]), strict=True))
    # Static shapes: the same graphs (the UNet's pieces between graph breaks) once per shape.
    assert at_compile % 2 == 0


def test_a_dynamic_compile_serves_both_buckets_with_one_set_of_graphs(
    tmp_path, two_buckets, static_graphs, eager_buckets
):
    events, tensors, at_compile, at_end = compiled_run(
        tmp_path, two_buckets, torch_compile_backend="eager", torch_compile_dynamic=True, **BUCKETS
    )
    assert at_end == at_compile, "a step recompiled"
    assert at_compile == static_graphs[0] // 2
    assert close(tensors, eager_buckets[1], 1e-5)
