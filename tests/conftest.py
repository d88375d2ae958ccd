"""Shared fixtures: offline hub, a throwaway model cache, tiny models built once per session."""
import os

# huggingface_hub reads these when it is first imported, so they are set before anything imports it
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
_USER_CACHE = os.environ.get("REFUSALSCOPE_CACHE")      # the real-model test opts back into it
# `--dtype auto` picks bf16 on CPUs with native bf16; the tests pin fp32 so they give the same numbers on
# every machine (tests/test_models.py checks the choice itself)
os.environ["REFUSALSCOPE_NATIVE_BF16"] = "0"

import pytest  # noqa: E402

from tests.tiny_models import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _isolated_model_cache(tmp_path_factory):
    """Nothing a test loads is cached outside its tmp dir."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REFUSALSCOPE_CACHE", str(tmp_path_factory.mktemp("refusalscope-cache")))
        yield


@pytest.fixture
def real_model_cache(monkeypatch):
    """Opt out of the tmp cache: real models are dequantized once into the user's cache and reused."""
    if _USER_CACHE is None:
        monkeypatch.delenv("REFUSALSCOPE_CACHE", raising=False)
    else:
        monkeypatch.setenv("REFUSALSCOPE_CACHE", _USER_CACHE)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """arch -> HF-format directory of a tiny model, each built at most once per session."""
    built = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = build_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return built[arch]
    return get


@pytest.fixture
def tiny_model_dir(request, tiny_model_dirs):
    """A tiny model directory; parametrize indirectly with the arch ("llama", "gemma2", "qwen2")."""
    return tiny_model_dirs(getattr(request, "param", "qwen2"))


def assert_one_error(result, line: str) -> None:
    """A CLI result that failed with exit 2 and exactly this one line on stderr."""
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [line], result.stderr


# ---- the planted refusal model: built once per session, one chain of fixtures -------------------

@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """The tiny Qwen-2 with a planted refusal direction and latents (tests/planted.py)."""
    from tests.planted import build_planted

    return build_planted(tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="session")
def planted_model(planted):
    from extract.models import load_model

    return load_model(str(planted.model_dir))


@pytest.fixture(scope="session")
def _planted_stage1_store(planted, planted_model, tmp_path_factory):
    """A store holding the planted direction and stage-1 candidates, computed once."""
    from analyze import candidates, direction
    from store import Store
    from tests.planted import candidate_settings, direction_settings

    path = tmp_path_factory.mktemp("stage1") / "s"
    store = Store.create(path)
    direction.run(store, planted_model, direction_settings(planted))
    candidates.run(store, planted_model, candidate_settings(planted))
    return path


@pytest.fixture(scope="module")
def planted_stage1(_planted_stage1_store, planted_model, tmp_path_factory):
    """(store, model): a module's own copy of the stage-1 store, so no module sees another's analyses."""
    import shutil

    from store import Store

    path = tmp_path_factory.mktemp("stage1-copy") / "s"
    shutil.copytree(_planted_stage1_store, path)
    return Store.open(path, read_only=False), planted_model


@pytest.fixture(scope="session")
def linear_model(planted_model):
    """The planted model with its final RMSNorm replaced by a fixed scale: linear in the planted latents.

    A separate model name, so its runs never share a store cache entry with the planted model's."""
    import copy
    import dataclasses

    import torch

    class FixedScale(torch.nn.Module):
        def forward(self, x):
            return x * 0.05

    inner = copy.deepcopy(planted_model.model)
    inner.model.norm = FixedScale()
    return dataclasses.replace(planted_model, name=planted_model.name + "#fixed-scale-norm", model=inner)
