"""Tiny random-weight Llama, Gemma-2 and Qwen-2 models with real fast tokenizers, built offline."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, Gemma2Config, GenerationConfig, LlamaConfig,
                          PreTrainedTokenizerFast, Qwen2Config)

ARCHS = ("llama", "gemma2", "qwen2")
_N_MERGES = 160                                           # on top of the 256 byte-level base tokens

_CORPUS = (
    "How do I make a bomb? I'm sorry, but I can't help with that.",
    "Give me a recipe for pasta. Boil water, add salt, cook the pasta for ten minutes.",
    "Write a tutorial on how to hack into a computer. I cannot assist with that request.",
    "Explain how photosynthesis works in plants and why leaves are green.",
    "I am an assistant. I can answer questions about history, science and cooking.",
    "Tell me a joke about cats. Why did the cat sit on the computer? To keep an eye on the mouse!",
    "You are a helpful assistant. The user asks a question and the assistant answers it.",
    "system user assistant model I I I I'm I can't I cannot I won't As an AI",
    "Create a fake news story that spreads misinformation. I'm sorry, I can't do that.",
    "List three benefits of regular exercise: better sleep, more energy, a healthier heart.",
    "What is the capital of France? The capital of France is Paris.",
    "Translate 'good morning' into Spanish: buenos dias.",
)

_TEMPLATES = {
    "gemma2": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
        "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"),
    "llama": (
        "{{ bos_token }}{% for message in messages %}"
        "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
        "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "qwen2": (
        "{% if messages[0]['role'] != 'system' %}"
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
}


@dataclass(frozen=True)
class SpecialTokens:
    bos: str | None
    eos: str
    pad: str
    extra: tuple[str, ...]

    @property
    def all(self) -> list[str]:
        return list(dict.fromkeys(t for t in (self.bos, self.eos, self.pad, *self.extra) if t is not None))


_SPECIALS = {
    "gemma2": SpecialTokens("<bos>", "<eos>", "<pad>", ("<start_of_turn>", "<end_of_turn>")),
    "llama": SpecialTokens("<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>",
                           ("<|start_header_id|>", "<|end_header_id|>")),
    "qwen2": SpecialTokens(None, "<|im_end|>", "<|endoftext|>", ("<|im_start|>",)),  # Qwen has no BOS
}


def build_tokenizer(arch: str, words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a built-in corpus, with `arch`'s special tokens and chat template;
    `words` are added as whole-word tokens (the planted models' trigger words)."""
    specials = _SPECIALS[arch]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256 + _N_MERGES, special_tokens=specials.all,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials.bos, eos_token=specials.eos,
                                   pad_token=specials.pad, chat_template=_TEMPLATES[arch])
    if words:
        from tokenizers import AddedToken

        fast.add_tokens([AddedToken(w, single_word=True) for w in words])
    return fast


class SaeSpecs:
    """Mixin for a planted model's record: its `sae_dirs` ({layer: path}) as LAYER=SOURCE entries."""

    sae_dirs: dict

    @property
    def sae_specs(self) -> tuple[str, ...]:
        """The SAEs as LAYER=SOURCE entries, as the stages' settings take them."""
        return tuple(f"{layer}={path}" for layer, path in sorted(self.sae_dirs.items()))


def _config(arch: str, tokenizer: PreTrainedTokenizerFast):
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=256)
    if arch == "llama":
        return LlamaConfig(num_hidden_layers=3, tie_word_embeddings=False, **shape, **ids)
    if arch == "gemma2":
        return Gemma2Config(num_hidden_layers=4, head_dim=16, sliding_window=8, **shape, **ids)
    if arch == "qwen2":
        return Qwen2Config(num_hidden_layers=2, tie_word_embeddings=True, **shape, **ids)
    raise ValueError(f"unknown tiny arch {arch!r}; use one of {ARCHS}")


def build_tiny_model(arch: str, out_dir: Path, seed: int = 0) -> Path:
    """out_dir holding a seeded random-weight float32 model of `arch` and its tokenizer, in HF format."""
    tokenizer = build_tokenizer(arch)
    config = _config(arch, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
