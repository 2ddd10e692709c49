import hashlib
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from runner.families.clip_text import clip_tokenizer
from runner.families.model import file_hashes
from runner.families.protocol import Base, ModelError
from runner.families.registry import base_to_ldm, load_base, save_pipeline

FAMILIES = ["sd15", "sdxl"]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request) -> Base:
    return load_base(f"tiny:{request.param}")


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt fails and is recorded, so a loader that swallows the error still shows."""
    attempts = []

    def refuse(sock, address):
        attempts.append(address)
        raise OSError(f"test forbids network access to {address}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield
    assert attempts == []


def modules(base: Base) -> list[torch.nn.Module]:
    return [base.unet, base.vae, *base.text_encoders]


def assert_same_weights(a: Base, b: Base) -> None:
    for ma, mb in zip(modules(a), modules(b), strict=True):
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys(), type(ma).__name__
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{type(ma).__name__}.{k}"


def token_ids(base: Base, text: str) -> list[list[int]]:
    return [tok(text).input_ids for tok in base.tokenizers]


# ---- tiny models ----


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_is_deterministic(family):
    a, b = load_base(f"tiny:{family}"), load_base(f"tiny:{family}")
    assert_same_weights(a, b)
    # No checkpoint file, so no file hashes (none invented).
    assert (a.sha256, a.model_hash, a.legacy_hash) == (None, None, None)
    assert a.family == family and a.vae_scale_factor == 4 and a.native_resolution == 64


def test_loading_leaves_the_callers_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    load_base("tiny:sd15")
    assert torch.equal(torch.rand(4), expected)


def test_tiny_models_are_frozen_in_eval_mode(tiny):
    for m in modules(tiny):
        assert not m.training
        assert not any(p.requires_grad for p in m.parameters())


def test_tiny_tokenizers_fit_their_text_encoders(tiny):
    assert len(tiny.tokenizers) == len(tiny.text_encoders) == (1 if tiny.family == "sd15" else 2)
    for tok, te in zip(tiny.tokenizers, tiny.text_encoders, strict=True):
        assert tok.model_max_length == 77
        assert len(tok) == te.config.vocab_size
        ids = tok("a photo of a cat, masterpiece " * 20, truncation=True).input_ids
        assert len(ids) == 77 and max(ids) < te.config.vocab_size
        assert (ids[0], ids[-1]) == (te.config.bos_token_id, te.config.eos_token_id)
    assert tiny.tokenizers[0].pad_token == "<|endoftext|>"
    if tiny.family == "sdxl":
        tok2 = tiny.tokenizers[1]
        assert tok2.pad_token == "!"
        padded = tok2("a cat", padding="max_length", max_length=77).input_ids
        assert padded[-1] == tok2.convert_tokens_to_ids("!") != tok2.eos_token_id


def test_tiny_unet_runs_on_the_text_encoders_output(tiny):
    prompts = ["a photo of a cat", "a dog"]
    ids = [
        tok(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        for tok in tiny.tokenizers
    ]
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        latents = tiny.vae.encode(image).latent_dist.sample()
        assert latents.shape == (2, 4, 16, 16)  # 64 / vae_scale_factor
        outs = [te(i, output_hidden_states=True) for te, i in zip(tiny.text_encoders, ids, strict=True)]
        if tiny.family == "sd15":
            context, added = outs[0].last_hidden_state, None
        else:
            context = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
            time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(2, 1)
            added = {"text_embeds": outs[1].text_embeds, "time_ids": time_ids}
        t = torch.tensor([10, 500])
        pred = tiny.unet(latents, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
    assert pred.shape == latents.shape and torch.isfinite(pred).all()
    assert tiny.noise_scheduler().config.num_train_timesteps == 1000


# ---- the full CLIP vocabulary ----


def test_clip_tokenizer_gives_the_real_clip_ids():
    tok = clip_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.pad_token_id == 49407
    assert clip_tokenizer(pad_token="!").pad_token_id == 0


# ---- full-size architectures, built without memory ----

PARAMS = {  # the published sizes of SD1.5's and SDXL's parts
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "te": [123_060_480]},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "te": [123_060_480, 694_659_840]},
}


def count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_random_builds_the_full_architecture_on_meta(family):
    with torch.device("meta"):
        base = load_base(f"random:{family}")
    assert base.unet.device.type == "meta"
    assert count(base.unet) == PARAMS[family]["unet"]
    assert count(base.vae) == PARAMS[family]["vae"]
    assert [count(te) for te in base.text_encoders] == PARAMS[family]["te"]
    assert [len(t) for t in base.tokenizers] == [49408] * len(PARAMS[family]["te"])
    assert base.vae_scale_factor == 8
    assert base.native_resolution == (512 if family == "sd15" else 1024)


# ---- diffusers folders ----


@pytest.mark.parametrize("with_tokenizer", [True, False])
def test_diffusers_folder_loads_the_same_model(tiny, tmp_path, no_network, with_tokenizer):
    folder = save_pipeline(tiny, tmp_path / "my model")
    if not with_tokenizer:
        for sub in ("tokenizer", "tokenizer_2"):
            shutil.rmtree(folder / sub, ignore_errors=True)
    loaded = load_base(str(folder))
    assert (loaded.family, loaded.name) == (tiny.family, "my model")
    assert_same_weights(tiny, loaded)
    # Without its own tokenizer the folder gets the shipped vocabulary cut to its text encoder's size.
    assert token_ids(loaded, "a photo of a cat") == token_ids(tiny, "a photo of a cat")
    assert [t.pad_token for t in loaded.tokenizers] == [t.pad_token for t in tiny.tokenizers]
    assert loaded.scheduler_config["num_train_timesteps"] == 1000
    # A folder is not one file: kohya and A1111 have no hash for it, and none is invented.
    assert (loaded.sha256, loaded.model_hash, loaded.legacy_hash) == (None, None, None)


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


@pytest.mark.parametrize(
    ("part", "changes", "message"),
    [
        ("model_index.json", {"_class_name": "FluxPipeline"}, "lacks text_encoder_2, tokenizer_2"),
        (
            "model_index.json",
            {"_class_name": "StableDiffusionInpaintPipeline"},
            "only SD1.5, SDXL, Flux.1 and Z-Image",
        ),
        ("unet/config.json", {"cross_attention_dim": 1024}, "Stable Diffusion 2"),
        ("unet/config.json", {"in_channels": 9}, "inpainting"),
    ],
)
def test_unsupported_diffusers_folders_are_refused(tmp_path, part, changes, message):
    folder = save_pipeline(load_base("tiny:sd15"), tmp_path / "m")
    edit_json(folder / part, **changes)
    with pytest.raises(ModelError, match=message):
        load_base(str(folder))


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(ModelError, match="not a diffusers model"):
        load_base(str(tmp_path))


def test_folder_with_missing_parts_says_what_is_missing(tmp_path):
    folder = save_pipeline(load_base("tiny:sd15"), tmp_path / "broken")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelError, match="broken could not be loaded as an sd15 diffusers model"):
        load_base(str(folder))
    shutil.rmtree(folder / "unet")
    with pytest.raises(ModelError, match="unet/config.json is missing or damaged"):
        load_base(str(folder))
    (folder / "model_index.json").write_text("{not json")
    with pytest.raises(ModelError, match="model_index.json is missing or damaged"):
        load_base(str(folder))


# ---- single-file checkpoints (A1111 / Civitai layout) ----


@pytest.fixture(scope="module")
def single_files(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """Tiny configs in the shape of runner/configs (no weights in them) and one LDM-layout file a family."""
    root = tmp_path_factory.mktemp("single")
    files = {}
    for family in FAMILIES:
        base = load_base(f"tiny:{family}")
        save_pipeline(base, root / "configs" / family)
        for weights in (root / "configs" / family).rglob("*.safetensors"):
            weights.unlink()
        files[family] = root / f"{family}_model.safetensors"
        save_file(base_to_ldm(base), files[family])
    return root / "configs", files


def test_single_file_checkpoint_loads_offline_with_its_hashes(tiny, single_files, no_network):
    configs, files = single_files
    path = files[tiny.family]
    loaded = load_base(str(path), config_root=configs)
    assert (loaded.family, loaded.name) == (tiny.family, f"{tiny.family}_model")
    assert_same_weights(tiny, loaded)
    assert token_ids(loaded, "a photo of a cat") == token_ids(tiny, "a photo of a cat")
    assert [t.pad_token for t in loaded.tokenizers] == [t.pad_token for t in tiny.tokenizers]
    data = path.read_bytes()
    assert loaded.sha256 == hashlib.sha256(data).hexdigest()
    assert loaded.model_hash == hashlib.sha256(data).hexdigest()[:10]
    assert loaded.legacy_hash == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_single_file_without_tokenizer_config_gets_the_shipped_vocabulary(single_files, tmp_path, no_network):
    configs, files = single_files
    bare = tmp_path / "configs"
    shutil.copytree(configs, bare)
    shutil.rmtree(bare / "sdxl" / "tokenizer_2")
    loaded = load_base(str(files["sdxl"]), config_root=bare)
    assert token_ids(loaded, "a cat") == token_ids(load_base("tiny:sdxl"), "a cat")
    assert loaded.tokenizers[1].pad_token == "!"


def test_damaged_single_file_names_the_file(single_files, tmp_path):
    configs, files = single_files
    sd = base_to_ldm(load_base("tiny:sd15"))
    sd["model.diffusion_model.out.2.weight"] = torch.zeros(4, 7, 3, 3)
    save_file(sd, tmp_path / "damaged.safetensors")
    with pytest.raises(ModelError, match="damaged.safetensors could not be loaded as an sd15 checkpoint"):
        load_base(str(tmp_path / "damaged.safetensors"), config_root=configs)


def write_keys(path: Path, keys: dict[str, tuple[int, ...]]) -> str:
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, path)
    return str(path)


UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
SD15_KEYS = {
    UNET_IN: (8, 4, 3, 3),
    "first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3),
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 8),
}
SDXL_KEYS = {
    UNET_IN: (8, 4, 3, 3),
    "first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3),
    "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 8),
    "conditioner.embedders.1.model.positional_embedding": (77, 16),
}


@pytest.mark.parametrize(("keys", "family"), [(SD15_KEYS, "sd15"), (SDXL_KEYS, "sdxl")])
def test_family_is_read_from_the_keys(tmp_path, keys, family):
    from runner.families.registry import file_family

    assert file_family(Path(write_keys(tmp_path / "m.safetensors", keys))).name == family


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            {
                "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (24, 8),
                UNET_IN: (8, 4, 3, 3),
            },
            "Stable Diffusion 2.x",
        ),
        (
            {"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": (8,)},
            "only the Flux transformer",
        ),
        ({"double_blocks.0.img_attn.norm.key_norm.scale": (8,)}, "LORACORD_FLUX_COMPONENTS"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8)}, "is a LoRA"),
        ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 8)}, "is a LoRA"),
        ({"encoder.conv_in.weight": (8, 3, 3, 3), "decoder.conv_out.weight": (3, 8, 3, 3)}, "is a VAE"),
        ({"conditioner.embedders.0.model.text_projection": (8, 8), UNET_IN: (8, 4, 3, 3)}, "SDXL refiner"),
        ({"something.else": (1,)}, "not an SD1.5 or SDXL checkpoint"),
        (SD15_KEYS | {UNET_IN: (8, 9, 3, 3)}, r"inpainting or edit checkpoint \(9 input channels\)"),
        (SDXL_KEYS | {UNET_IN: (8, 9, 3, 3)}, "inpainting"),
        ({k: v for k, v in SD15_KEYS.items() if not k.startswith("first_stage")}, "no VAE"),
        ({k: v for k, v in SD15_KEYS.items() if k != UNET_IN}, "no UNet"),
    ],
)
def test_unsupported_checkpoints_are_refused_by_name(tmp_path, keys, message):
    path = write_keys(tmp_path / "odd model.safetensors", keys)
    with pytest.raises(ModelError, match=message) as err:
        load_base(path)
    assert "odd model.safetensors" in str(err.value)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\xff" * 64])
def test_corrupt_files_are_refused(tmp_path, content):
    (tmp_path / "bad.safetensors").write_bytes(content)
    with pytest.raises(ModelError, match="bad.safetensors is not a readable .safetensors checkpoint"):
        load_base(str(tmp_path / "bad.safetensors"))


def test_pickled_checkpoints_are_never_opened(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"anything")
    with pytest.raises(ModelError, match=r"only \.safetensors"):
        load_base(str(path))


@pytest.mark.parametrize("name", ["/no/such/model.safetensors", "sd15", "tiny:", "some/hub-repo"])
def test_unknown_names_list_what_is_accepted(name):
    with pytest.raises(
        ModelError,
        match="unknown base model .* tiny:sd15, tiny:sd15-v, tiny:sdxl, tiny:flux.*, random:sd15, random:sdxl, random:flux",
    ):
        load_base(name)


@pytest.mark.parametrize("name", ["tiny:sd3", "random:sd3"])
def test_unknown_family_is_refused(name):
    with pytest.raises(ModelError, match="unknown family"):
        load_base(name)


# ---- A1111 hashes ----


@pytest.mark.parametrize("size", [0x100000 + 0x10000 + 5, 0x100000 + 10, 1000])
def test_file_hashes_match_a1111(tmp_path, size):
    data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(size))
    path = tmp_path / "f.bin"
    path.write_bytes(data.numpy().tobytes())
    raw = path.read_bytes()
    assert file_hashes(path) == (
        hashlib.sha256(raw).hexdigest(),
        hashlib.sha256(raw[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8],
    )
