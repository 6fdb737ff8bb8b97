"""How a request's prompt splits into a context, cached and compressed once, and the rest, fed uncompressed.

Chat (``/v1/chat/completions``, models with a chat template)
    The candidate context is the system message, or without one the first user message. It is the context when
    its content has at least ``threshold`` tokens. The template is rendered once with the generation prompt and
    cut right after the context's content; the two pieces are tokenized apart (no special tokens added), as
    the benchmark's protocol does (:mod:`headwise.bench.protocol`), so every request with the same context
    starts with the same token ids.
Completion (``/v1/completions``, any model)
    The candidate context is the prompt up to and including its last blank line (``"\\n\\n"``), with the BOS
    token where the model wants one; the rest is what follows the blank line, and may be empty.

A prompt without a long enough candidate has no context: it is prefilled whole with the full cache, uncached.
"""

from __future__ import annotations

from dataclasses import dataclass

from headwise.errors import HeadwiseError
from headwise.generation import build_prompt
from headwise.models import LoadedModel
from headwise.policies.kvzip import REPEAT

SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Prompt:
    """Token ids of a request: the context (empty when there is none) and the rest. ``repeat``, with a context:
    what KVzip's reconstruction feeds after it (:func:`headwise.dense.reconstruct`): the request to repeat it, in
    the prompt's format, and the context's text to copy."""

    context: list[int]
    rest: list[int]
    repeat: tuple[list[int], list[int]] | None = None

    @property
    def tokens(self) -> int:
        return len(self.context) + len(self.rest)


def _ids(lm: LoadedModel, text: str) -> list[int]:
    return list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_prompt(lm: LoadedModel, messages: list[dict[str, str]], threshold: int) -> Prompt:
    """Split a chat request (``messages`` already checked: roles and string contents)."""
    tok = lm.tokenizer
    if not getattr(tok, "chat_template", None):
        raise HeadwiseError(f"model '{lm.name}' has no chat template: use /v1/completions")
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    roles = [m["role"] for m in messages]
    first = roles.index("system") if "system" in roles else roles.index("user") if "user" in roles else None
    content = messages[first]["content"] if first is not None else ""
    copied = _ids(lm, content) if content else []
    if not content or len(copied) < threshold:
        return Prompt([], _ids(lm, rendered))
    start = rendered.find(content)
    if start < 0:
        raise HeadwiseError(f"{lm.name}'s chat template altered the context message; cannot split the prompt")
    end = start + len(content)
    # the request to repeat it: a user turn after a system context, appended to a user context (as the benchmark
    # asks its questions), so that the template's roles stay as they were
    asking = ([messages[first], {"role": "user", "content": REPEAT}] if roles[first] == "system"
              else [{"role": "user", "content": content + SEPARATOR + REPEAT}])
    request = tok.apply_chat_template(asking, add_generation_prompt=True, tokenize=False)
    request = request[request.find(content) + len(content):]
    return Prompt(_ids(lm, rendered[:end]), _ids(lm, rendered[end:]), (_ids(lm, request), copied))


def completion_prompt(lm: LoadedModel, text: str, threshold: int) -> Prompt:
    """Split a completion request's prompt at its last blank line."""
    cut = text.rfind(SEPARATOR)
    if cut >= 0:
        context, rest = text[: cut + len(SEPARATOR)], text[cut + len(SEPARATOR):]
        copied = _ids(lm, context)
        if len(copied) >= threshold:
            repeat = (_ids(lm, REPEAT + SEPARATOR), copied)
            return Prompt(build_prompt(lm, context, chat=False), _ids(lm, rest) if rest else [], repeat)
    return Prompt([], build_prompt(lm, text, chat=False))
