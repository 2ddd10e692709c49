"""The same scheduler on Ray actors, on a local CPU Ray instance: every job kind runs with its files
moved to and from the actor in chunks; a killed actor's job resumes; cancels land, even before the
job's files have arrived."""

from __future__ import annotations

import asyncio
import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'loracord[ray]'")
pytest.importorskip("onnxruntime")

from botutil import TRAIN, write_config  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_dispatch import drive, finished  # noqa: E402
from test_gen import make_lora  # noqa: E402
from test_tagger import TAGS, build_tagger, image_with  # noqa: E402

from bot import jobs, store  # noqa: E402
from bot.dispatch import WorkerEvent, make_dispatcher  # noqa: E402
from bot.dispatch.raycluster import CHUNK_BYTES, Place, RayDispatcher, places, rewrite  # noqa: E402
from bot.files import member_path  # noqa: E402
from bot.scheduler import Scheduler  # noqa: E402
from runner.data.tagger import tag_dataset  # noqa: E402
from runner.selftest import make_demo_dataset  # noqa: E402
from runner.spec import FailedEvent, TagSpec  # noqa: E402
from runner.worker import Worker  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    # One Ray for the module: starting it is most of a test's time on a small machine. The
    # dispatchers find it running and leave it so.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def ray_server(tmp_path: Path, devices: str = '["cpu"]', extra: str = ""):
    cfg = write_config(
        tmp_path, f"[scheduling]\npoll_seconds = 0.05\n{extra}", devices=devices, dispatch="ray"
    )
    return cfg, store.open_store(cfg.store)


def test_a_job_spec_names_copies_in_its_node_folder_and_keeps_the_base():
    spec = {
        "prompt": "/data/alice/gen/7 is not a path to move",
        "base": "/models/base.safetensors",
        "output_dir": "/data/bob/gen/7",
        "loras": [
            {"name": "/data/alice/loras/3/キャラ.safetensors", "weight": 0.8},
            {"name": "style", "weight": 1.0},  # a name, looked up in lora_dir
        ],
        "lora_dir": "/data/bob/loras",
    }
    moved = places(spec)
    assert moved == [
        Place("lora_dir", "/data/bob/loras", True),
        Place("output_dir", "/data/bob/gen/7", True),
        Place("loras/0/キャラ.safetensors", "/data/alice/loras/3/キャラ.safetensors", False),
    ]
    node = rewrite(spec, {p.path: f"/tmp/job/{p.rel}" for p in moved})
    assert node == {
        **spec,
        "output_dir": "/tmp/job/output_dir",
        "lora_dir": "/tmp/job/lora_dir",
        "loras": [
            {"name": "/tmp/job/loras/0/キャラ.safetensors", "weight": 0.8},
            {"name": "style", "weight": 1.0},
        ],
    }
    # A folder's sibling that shares its name's start is not inside it.
    assert rewrite(["/data/bob/gen/7/a.png", "/data/bob/gen/70/a.png"], {"/data/bob/gen/7": "/x"}) == [
        "/x/a.png",
        "/data/bob/gen/70/a.png",
    ]


def test_ray_actors_run_jobs_resume_after_a_killed_actor_and_send_files_back(tmp_path, local_ray):
    cfg, db = ray_server(tmp_path, '["cpu", "cpu"]', "[quota]\nconcurrent_jobs = 2\n")
    make_demo_dataset(member_path(cfg.data_dir, "alice", "datasets", "ds"), count=2, repeats=1)
    killed = jobs.submit_train(db, cfg, "alice", "ds", "tiny", "k", {**TRAIN, "max_train_epochs": 3})
    reference = jobs.submit_train(db, cfg, "alice", "ds", "tiny", "r", {**TRAIN, "max_train_epochs": 3})
    gen = jobs.submit_gen(db, cfg, "bob", "a red circle", "tiny", {"steps": 2, "seed": 3})
    dispatcher = make_dispatcher(cfg)
    sched = Scheduler(db, cfg, dispatcher)
    kills: list[str] = []

    def on_event(job, event):
        if job.id == killed.id and event.type == "progress" and event.epoch == 2 and not kills:
            kills.append(job.worker)
            dispatcher.kill(job.worker)

    sched.subscribe(on_event)
    asyncio.run(drive(sched, lambda: finished(db), timeout=300))
    states = {j.id: j.state for j in store.list_jobs(db)}
    assert states == {killed.id: "done", reference.id: "done", gen.id: "done"}, states
    job = store.get_job(db, killed.id)
    assert kills and job.attempts == 2 and sched.restarts == 1
    assert any(
        e["type"] == "stage" and e["message"] == "resuming after epoch 1"
        for e in store.job_events(db, killed.id)
    )
    files = {j.id: json.loads(store.get_job(db, j.id).result) for j in (killed, reference, gen)}
    out = member_path(cfg.data_dir, "alice", "loras", str(killed.id))
    assert Path(files[killed.id]["lora_file"]) == out / "k.safetensors"
    a, b = load_file(files[killed.id]["lora_file"]), load_file(files[reference.id]["lora_file"])
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    images = [Path(p) for p in files[gen.id]["images"]]
    assert images and all(p.is_file() and p.is_relative_to(cfg.data_dir) for p in images)
    assert {a["path"] for a in store.artifacts(db, gen.id)} == {str(p) for p in images}


def test_tag_job_on_ray_writes_captions_into_the_bots_dataset_streaming_its_images(tmp_path, local_ray):
    cfg, db = ray_server(tmp_path)
    tagger = build_tagger(tmp_path / "tagger", tags=TAGS)
    data = member_path(cfg.data_dir, "alice", "datasets", "ds")
    (data / "10_sks").mkdir(parents=True)
    base = {"hatsune_miku": 0.95, "blue_hair": 0.9, "1girl": 0.8}
    for i, extra in enumerate([{"outdoors": 0.7}, {"smile": 0.7}]):
        image_with(base | extra).save(data / "10_sks" / f"{i:04d}.png")
    # Uncompressed, so the file is several chunks: a chunk lost or misplaced on the way makes it
    # unreadable there, and its caption would not match.
    big = image_with(base | {"star_(symbol)": 0.92}, size=3000)
    big.save(data / "10_sks" / "0002.png", compress_level=0)
    size = (data / "10_sks" / "0002.png").stat().st_size
    assert size > 6 * CHUNK_BYTES
    copy = shutil.copytree(data, tmp_path / "reference")
    settings = {"tagger": str(tagger), "trigger_word": "sks", "batch_size": 2}
    expected = tag_dataset(TagSpec.parse({**settings, "train_data_dir": str(copy)}), lambda e: None)
    job = jobs.submit_tag(db, cfg, "alice", "ds", settings)
    sched = Scheduler(db, cfg, make_dispatcher(cfg))
    tracemalloc.start()
    try:
        asyncio.run(drive(sched, lambda: finished(db), timeout=180))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    job = store.get_job(db, job.id)
    assert job.state == "done", job.failure
    captions = sorted(p.relative_to(copy) for p in copy.rglob("*.txt"))
    assert [str(p) for p in captions] == [f"10_sks/{i:04d}.txt" for i in range(3)]
    for rel in captions:
        assert (data / rel).read_text(encoding="utf-8") == (copy / rel).read_text(encoding="utf-8")
    result = json.loads(job.result)
    assert result.pop("seconds") > 0  # the worker stamps the job's own compute time
    assert result == expected.model_dump(mode="json", exclude={"seconds"})
    # The big image went up a chunk at a time: the bot's Python heap never held it whole.
    assert peak < size / 2, (peak, size)


def test_gen_on_ray_with_a_members_lora_matches_a_local_worker(tmp_path, local_ray):
    cfg, db = ray_server(tmp_path)
    lora = member_path(cfg.data_dir, "alice", "loras", "4", "キャラ.safetensors")
    lora.parent.mkdir(parents=True)
    make_lora(lora)
    settings = {"steps": 2, "seed": 5, "width": 64, "height": 64, "count": 2}
    job = jobs.submit_gen(
        db, cfg, "bob", "portrait", "tiny", {**settings, "loras": [{"name": str(lora), "weight": 0.9}]}
    )
    dispatcher = make_dispatcher(cfg)
    dispatcher.chunk_bytes = 4096  # the LoRA and each image in several chunks, in order
    asyncio.run(drive(Scheduler(db, cfg, dispatcher), lambda: finished(db), timeout=180))
    job = store.get_job(db, job.id)
    assert job.state == "done", job.failure
    result = json.loads(job.result)
    local: list = []
    Worker("cpu").run(
        {"type": "gen", "spec": {**job.spec_dict, "output_dir": str(tmp_path / "ref")}}, local.append
    )
    expected = local[-1]
    assert expected.type == "images" and result["parameters"] == expected.parameters
    assert "Lora hashes" in result["parameters"][0]
    for got, want in zip(result["images"], expected.images, strict=True):
        assert Path(got).parent == Path(job.spec_dict["output_dir"])
        a = np.asarray(Image.open(got), dtype=np.int16)
        b = np.asarray(Image.open(want), dtype=np.int16)
        assert np.abs(a - b).max() <= 1  # thread counts may round a pixel differently


def test_cancel_on_ray_stops_a_training_run(tmp_path, local_ray):
    cfg, db = ray_server(tmp_path)
    make_demo_dataset(member_path(cfg.data_dir, "alice", "datasets", "ds"), count=2, repeats=1)
    job = jobs.submit_train(db, cfg, "alice", "ds", "tiny", "c", {**TRAIN, "max_train_epochs": 1000})
    sched = Scheduler(db, cfg, make_dispatcher(cfg))
    asked: list[int] = []

    def on_event(j, event):
        if event.type == "progress" and not asked:
            asked.append(event.step)
            jobs.request_cancel(db, j.id)

    sched.subscribe(on_event)
    asyncio.run(drive(sched, lambda: finished(db), timeout=180))
    job = store.get_job(db, job.id)
    assert asked and job.state == "cancelled", (job.state, job.failure)


def test_a_cancel_while_the_files_go_up_ends_the_job_before_it_starts(tmp_path, local_ray):
    data = tmp_path / "ds"
    make_demo_dataset(data, count=2, repeats=1)

    async def main() -> list:
        inbox: asyncio.Queue = asyncio.Queue()
        dispatcher = RayDispatcher(["cpu"], None, None, tmp_path)
        await dispatcher.start(inbox)
        worker = dispatcher.workers[0]
        spec = {"train_data_dir": str(data), "tagger": "unused: the job never starts"}
        try:
            await dispatcher.send(worker, 7, "tag", spec)
            await dispatcher.cancel(worker, 7)
            first = await asyncio.wait_for(inbox.get(), 120)
            await asyncio.sleep(1)  # nothing else comes for it
            return [first, *(inbox.get_nowait() for _ in range(inbox.qsize()))]
        finally:
            await dispatcher.close()

    messages = asyncio.run(main())
    assert len(messages) == 1 and isinstance(messages[0], WorkerEvent) and messages[0].job_id == 7
    event = messages[0].event
    assert isinstance(event, FailedEvent) and event.kind == "cancelled"


def test_a_result_that_cannot_be_written_back_fails_the_job_and_the_worker_goes_on(tmp_path, local_ray):
    cfg, db = ray_server(tmp_path)
    blocked = jobs.submit_gen(
        db, cfg, "bob", "a red circle", "tiny", {"steps": 1, "seed": 3, "width": 64, "height": 64}
    )
    # A file where the job's output folder should be: its images cannot land on the bot's side.
    out = Path(blocked.spec_dict["output_dir"])
    out.parent.mkdir(parents=True)
    out.write_text("in the way")
    after = jobs.submit_gen(
        db, cfg, "bob", "a blue square", "tiny", {"steps": 1, "seed": 4, "width": 64, "height": 64}
    )
    asyncio.run(drive(Scheduler(db, cfg, make_dispatcher(cfg)), lambda: finished(db), timeout=180))
    blocked, after = store.get_job(db, blocked.id), store.get_job(db, after.id)
    assert blocked.state == "failed" and "could not be moved" in blocked.failure, blocked.failure
    assert after.state == "done", after.failure
    assert all(Path(p).is_file() for p in json.loads(after.result)["images"])
