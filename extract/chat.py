"""Chat templates and token roles: which tokens of a rendered chat are the user's instruction."""
from __future__ import annotations

from dataclasses import dataclass

from jinja2 import TemplateError

from store.errors import UsageError

ROLES = ("first", "template", "user", "post_instruction")
_SENTINEL = "RefusalscopeUserTextSentinel"


@dataclass(frozen=True)
class Chat:
    chat_text: str
    input_ids: list[int]
    roles: list[str]                                      # one of ROLES per token
    token_texts: list[str]

    def __post_init__(self) -> None:
        assert len(self.input_ids) == len(self.roles) == len(self.token_texts)


def render_chat(tokenizer, text: str, system: str | None = None) -> Chat:
    """The user turn rendered with the model's chat template, ready for the assistant's reply, with token roles."""
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("the tokenizer has no chat template; use an instruction-tuned model "
                         "or a model directory whose tokenizer_config carries one")
    if not text:
        raise UsageError("the prompt text is empty")
    chat_text = _apply(tokenizer, text, system)
    user_start, user_end = _user_span(chat_text, _apply(tokenizer, _SENTINEL, system), text)
    # the template already holds the model's special tokens (<bos>, <|begin_of_text|>, <|im_start|>)
    encoded = tokenizer(chat_text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    roles, cursor = [], 0
    for pos, (begin, end) in enumerate(encoded["offset_mapping"]):
        if end > begin:
            cursor = end
        else:                                             # a special token reported as (0, 0): place it at the cursor
            begin = end = cursor
        roles.append(_role(pos, begin, end, user_start, user_end))
    return Chat(chat_text, ids, roles, tokenizer.convert_ids_to_tokens(ids))


def _apply(tokenizer, text: str, system: str | None) -> str:
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": text})
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError as err:                          # e.g. Gemma's "System role not supported"
        raise UsageError(f"the model's chat template refuses this chat: {err}") from err


def _user_span(chat_text: str, sentinel_text: str, text: str) -> tuple[int, int]:
    """Character span of the user text: where a sentinel prompt lands in the same template (a plain search
    could hit the template's own words, e.g. a prompt "assistant")."""
    start = sentinel_text.index(_SENTINEL)
    for rendered in (text, text.strip()):             # some templates trim the content (Gemma, Llama 3)
        if rendered and chat_text.startswith(sentinel_text[:start]) and chat_text[start:].startswith(rendered):
            return start, start + len(rendered)
    raise UsageError("the chat template rewrites the prompt text, so its tokens cannot be located; "
                     "pass the prompt without template markup")


def _role(pos: int, begin: int, end: int, user_start: int, user_end: int) -> str:
    """A token's role from its character span [begin, end); position 0 is always "first"."""
    if pos == 0:
        return "first"
    if end <= user_start:
        return "template"
    if begin >= user_end:
        return "post_instruction"
    return "user"


def render_raw(tokenizer, text: str, add_bos: bool) -> Chat:
    """Plain text without a chat template (general-text cross-entropy), BOS first when the model has one.

    Roles: position 0 is "first", every other token "user" (so the tokens a loss is taken over are
    the user-role ones in both renderings).
    """
    if not text:
        raise UsageError("the text is empty")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if add_bos:
        ids = [tokenizer.bos_token_id, *ids]
    roles = ["first"] + ["user"] * (len(ids) - 1)
    return Chat(text, ids, roles, tokenizer.convert_ids_to_tokens(ids))
