"""Shared fixtures: the tiny NewBie models and a real ComfyUI server per host version (devkit/harness.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host_features  # noqa: E402
from devkit import harness  # noqa: E402

HOSTS = harness.find_hosts()
LANES = [lane for lane, path in HOSTS.items() if path is not None]
_MISSING_HOST_WARNED = False


def _cache_dir() -> Path:
    root = os.environ.get("NEWBIE_TEST_CACHE") or str(Path.home() / ".cache" / "comfyui-newbie-lowvram" / "models")
    return Path(root)


def pytest_report_header(config):
    lines = [f"ComfyUI hosts: {', '.join(f'{k}={v}' for k, v in HOSTS.items())}"]
    if not LANES:
        lines.append("!!! NO COMFYUI HOST FOUND: host tests will be SKIPPED. Looked in: " + harness.where_looked())
    return lines


def pytest_collection_modifyitems(config, items):
    if LANES:
        return
    skip = pytest.mark.skip(reason="no ComfyUI host found; looked in " + harness.where_looked())
    for item in items:
        if "host" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy_import_path():
    """Put the primary host on sys.path so the model factory can read ComfyUI's classes."""
    host = HOSTS["v0.33"] or HOSTS["v0.8"]
    if host is None:
        pytest.skip("no ComfyUI host found; looked in " + harness.where_looked())
    if str(host) not in sys.path:
        sys.path.insert(0, str(host))
    sys.path.insert(0, str(harness.REPO))
    return host


@pytest.fixture
def comfy_on_cpu(comfy_import_path):
    """ComfyUI's model management imported safely on a machine without CUDA (use with usefixtures)."""
    from devkit import tiny_models

    tiny_models._comfy_cpu_safe()


@pytest.fixture
def comfy_device_is_the_cpu(comfy_import_path, monkeypatch):
    """ComfyUI's torch device is the CPU for this test, on a machine with CUDA too: for tests of the CPU's
    arithmetic and of CPU stand-ins, which a GPU machine would otherwise build and sample on the GPU in bf16."""
    import comfy.model_management as mm
    import torch

    monkeypatch.setattr(mm, "get_torch_device", lambda: torch.device("cpu"))


@pytest.fixture
def dynamic_vram_layers(comfy_import_path, monkeypatch):
    """ComfyUI's dynamic VRAM switched on (v0.33; a CPU host never turns it on): its layers are built without
    weights and its core patcher is the dynamic one. Skips on a host without it (v0.8)."""
    monkeypatch.setattr(host_features.dynamic_vram_module(), "aimdo_enabled", True)


@pytest.fixture(scope="module")
def tiny_dit(comfy_import_path):
    """The tiny DiT's random fp32 state dict (seed 0), in memory."""
    import torch

    from devkit import tiny_models

    return tiny_models.random_dit(torch.float32)


@pytest.fixture(scope="module")
def tiny_parts(comfy_import_path):
    """The tiny model's four parts in memory (no files), as the loader hands them to build_model."""
    from devkit import tiny_models

    return tiny_models.in_memory_parts()


@pytest.fixture(scope="session")
def models_root(comfy_import_path, tmp_path_factory) -> Path:
    """Tiny NewBie models in both layouts, written once into a cache (keyed by fingerprint) and linked into
    a per-session models folder, so tests may add broken files without touching the cache."""
    from devkit import tiny_models

    cache = _cache_dir()
    tiny_models.write_all(cache)
    root = tmp_path_factory.mktemp("models")
    for sub in ("diffusion_models", "text_encoders", "vae", "diffusers"):
        (root / sub).mkdir()
        src = cache / sub
        if src.is_dir():
            for entry in src.iterdir():
                if not entry.name.startswith("."):
                    (root / sub / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    _write_example_lora(root)
    return root


def _write_example_lora(root: Path) -> None:
    """The LoRA the example workflow names (tests/ui_to_api.py EXAMPLE_LORA_TO_TINY): a PEFT LoRA in NewBie's
    trainer layout for the tiny DiT, written by PEFT itself (tests/lora_files.py)."""
    import lora_files
    from safetensors.torch import load_file

    from devkit import tiny_models

    dit = load_file(str(root / tiny_models.SINGLE_FILE_NAMES["dit"].format(name=tiny_models.TINY.name)))
    lora_files.write_peft(root / "loras" / "newbie-tiny-trainer-lora", {k: v.float() for k, v in dit.items()})


@pytest.fixture(scope="session", params=LANES or ["none"])
def server(request, models_root, tmp_path_factory):
    lane = request.param
    host = HOSTS.get(lane)
    if host is None:
        pytest.skip("no ComfyUI host found; looked in " + harness.where_looked())
    srv = harness.ComfyServer(host, tmp_path_factory.mktemp(f"comfy-{lane}"), models_root)
    srv.lane = lane
    srv.start()
    yield srv
    srv.stop()
