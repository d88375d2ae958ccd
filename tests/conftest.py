"""Shared fixtures: offline hub, a throwaway model cache, tiny models built once per session."""
import os

# huggingface_hub reads these when it is first imported, so they are set before anything imports it
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
_USER_CACHE = os.environ.get("REFUSALSCOPE_CACHE")      # the real-model test opts back into it

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
