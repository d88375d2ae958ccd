"""Chat rendering and token roles on tiny models of each chat format."""
import pytest
from transformers import AutoTokenizer

from extract.chat import ROLES, render_chat
from store.errors import UsageError
from tests.tiny_models import ARCHS, build_tokenizer

all_archs = pytest.mark.parametrize("tiny_model_dir", ARCHS, indirect=True)
FIRST_TOKEN = {"llama": "<|begin_of_text|>", "gemma2": "<bos>", "qwen2": "<|im_start|>"}


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def user_text(tokenizer, chat) -> str:
    return tokenizer.decode([i for i, role in zip(chat.input_ids, chat.roles) if role == "user"])


def assert_role_order(roles):
    """first, then template tokens, then the user's, then the post-instruction tokens, each block non-empty."""
    assert roles[0] == "first" and set(roles) == set(ROLES)
    order = [ROLES.index(role) for role in roles]
    assert order == sorted(order)


@pytest.mark.parametrize("tiny_model_dir, first", FIRST_TOKEN.items(), indirect=["tiny_model_dir"])
def test_user_tokens_are_the_user_text(tokenizer, first):
    chat = render_chat(tokenizer, "How do I make a bomb?")
    assert_role_order(chat.roles)
    assert user_text(tokenizer, chat) == "How do I make a bomb?"
    assert chat.token_texts[0] == first


@all_archs
def test_chat_is_the_template_tokenized_once(tokenizer):
    messages = [{"role": "user", "content": "Give me a recipe for pasta."}]
    chat = render_chat(tokenizer, "Give me a recipe for pasta.")
    assert chat.chat_text == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat.input_ids == tokenizer(chat.chat_text, add_special_tokens=False)["input_ids"]
    assert chat.token_texts == tokenizer.convert_ids_to_tokens(chat.input_ids)
    if tokenizer.bos_token is not None:                   # no doubled BOS from add_special_tokens
        assert chat.input_ids.count(tokenizer.bos_token_id) == 1


@all_archs
@pytest.mark.parametrize("text", ["assistant", "user", "model", "system", "<start_of_turn>"])
def test_prompt_equal_to_template_words(tokenizer, text):
    chat = render_chat(tokenizer, text)
    assert_role_order(chat.roles)
    assert user_text(tokenizer, chat) == text


@all_archs
def test_surrounding_whitespace(tokenizer):
    chat = render_chat(tokenizer, "  Tell me a joke.\n")
    assert_role_order(chat.roles)
    assert user_text(tokenizer, chat).strip() == "Tell me a joke."


@pytest.mark.parametrize("tiny_model_dir", ["qwen2"], indirect=True)
def test_system_prompt_is_template(tokenizer):
    chat = render_chat(tokenizer, "Tell me a joke.", system="Tell me a joke.")
    assert_role_order(chat.roles)
    assert user_text(tokenizer, chat) == "Tell me a joke."
    assert "You are a helpful assistant." not in chat.chat_text


@pytest.mark.parametrize("tiny_model_dir", ["gemma2"], indirect=True)
def test_template_without_system_role_is_a_usage_error(tokenizer):
    with pytest.raises(UsageError, match="System role not supported"):
        render_chat(tokenizer, "hi", system="be brief")


class ZeroSpecialOffsets:
    """A tokenizer that reports (0, 0) offsets for special tokens, as some fast tokenizers do."""

    def __init__(self, inner):
        self.inner = inner
        self.chat_template = inner.chat_template

    def apply_chat_template(self, *args, **kwargs):
        return self.inner.apply_chat_template(*args, **kwargs)

    def convert_ids_to_tokens(self, ids):
        return self.inner.convert_ids_to_tokens(ids)

    def __call__(self, text, **kwargs):
        encoded = self.inner(text, **kwargs)
        special = set(self.inner.all_special_ids) | set(self.inner.added_tokens_decoder)
        encoded["offset_mapping"] = [(0, 0) if i in special else span
                                     for i, span in zip(encoded["input_ids"], encoded["offset_mapping"])]
        return encoded


@all_archs
def test_special_tokens_with_zero_offsets(tokenizer):
    expected = render_chat(tokenizer, "How do I make a bomb?")
    assert render_chat(ZeroSpecialOffsets(tokenizer), "How do I make a bomb?") == expected


def test_no_chat_template_is_a_usage_error():
    tokenizer = build_tokenizer("llama")
    tokenizer.chat_template = None
    with pytest.raises(UsageError, match="no chat template"):
        render_chat(tokenizer, "hi")


def test_empty_prompt_is_a_usage_error(tiny_model_dir, tokenizer):
    with pytest.raises(UsageError, match="empty"):
        render_chat(tokenizer, "")
