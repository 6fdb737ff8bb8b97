"""The benchmark protocol, in one place: headwise's runner and every peer runner call these functions.

Prompt
    The prompt is ``context + "\\n\\n" + question``. Instruct models get it as one user turn of their chat
    template: the chat prompt is rendered once, checked to hold the context unchanged, and cut right after
    the context; the two pieces are tokenized separately (no special tokens added), so every method and
    every library sees the very same token ids. The second piece ends with the sample's answer prefix, the start
    of the model's own turn (RULER's answer prefixes; kvpress's pipeline puts its ``answer_prefix`` in the same
    place). Base models get ``BOS + context`` (the BOS token where the model wants one, see
    :func:`headwise.generation.build_prompt`) and ``"\\n\\n" + question + "\\nAnswer: " + answer_prefix``.
    All the questions of one context share its first piece (:func:`context_parts` checks it).
Question-agnostic use
    The context piece is prefilled and compressed, the cache is sealed, and each question is answered on its
    own deep copy of that cache: its piece is fed uncompressed, then the answer is decoded greedily
    (:func:`answer`), at most ``max_new_tokens``, up to an end-of-sequence token, and stripped.
Scoring
    The sample's rule (:mod:`headwise.bench.scoring`) on the stripped text.
Fidelity
    The full cache's greedy answer (its token ids) is teacher-forced after the question in a copy of the
    compressed cache (:func:`follow`): the mean negative log-likelihood per answer token and the fraction of
    answer tokens that are still the top choice. The full cache's own NLL of its answer is the floor.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from headwise.bench.scoring import score
from headwise.bench.tasks import SEPARATOR, Sample, generate, token_counter
from headwise.compat import forward
from headwise.errors import HeadwiseError
from headwise.generation import Sampling, build_prompt, decode, prefill, stop_token_ids
from headwise.models import LoadedModel
from headwise.policies.kvzip import REPEAT


def prompt_parts(lm: LoadedModel, sample: Sample) -> tuple[list[int], list[int]]:
    """Token ids of the prompt split after the context: (context piece, question piece + template suffix)."""
    tok = lm.tokenizer
    if lm.instruct and getattr(tok, "chat_template", None):
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": sample.prompt}], add_generation_prompt=True, tokenize=False
        )
        if sample.context not in rendered:
            raise HeadwiseError(f"{lm.name}'s chat template altered the context of {sample.id}; cannot split it")
        end = rendered.index(sample.context) + len(sample.context)
        head = tok(rendered[:end], add_special_tokens=False)["input_ids"]
        return list(head), list(tok(rendered[end:] + sample.answer_prefix, add_special_tokens=False)["input_ids"])
    head = build_prompt(lm, sample.context, chat=False)
    tail = f"{SEPARATOR}{sample.question}\nAnswer: {sample.answer_prefix}".rstrip()
    return head, list(tok(tail, add_special_tokens=False)["input_ids"])


def reconstruction_parts(lm: LoadedModel, sample: Sample) -> tuple[list[int], list[int]]:
    """What KVzip feeds after a sample's context piece (:func:`headwise.dense.reconstruct`): the request to repeat
    the context, in the prompt's own format (the question piece of :func:`prompt_parts`, with the request as the
    question and no answer prefix), and the context's text to copy, as token ids."""
    request = prompt_parts(lm, replace(sample, question=REPEAT, answer_prefix=""))[1]
    return request, list(lm.tokenizer(sample.context, add_special_tokens=False)["input_ids"])


def timing_prompt(lm: LoadedModel, length: int) -> tuple[Sample, list[int]]:
    """The prompt the speed scripts time: the benchmark's first passkey sample of ``length`` tokens (seed 0,
    needle at depth 0.5), and its token ids, question included."""
    sample = generate("passkey", length, 1, 0, token_counter(lm.tokenizer), tokenizer_name=lm.name, depths=(0.5,))[0]
    head, tail = prompt_parts(lm, sample)
    return sample, head + tail


def context_parts(lm: LoadedModel, questions: Sequence[Sample]) -> tuple[list[int], list[list[int]]]:
    """The shared context piece of several questions on one context, and each question's piece.

    Raises when a question would not fit in the model's context (with its ``max_new_tokens``) or when the
    questions do not share their context piece (different contexts, or a template that depends on the question).
    """
    head: list[int] | None = None
    tails = []
    for sample in questions:
        this, tail = prompt_parts(lm, sample)
        if head is not None and this != head:
            raise HeadwiseError(f"{sample.id} does not share its context's prompt with {questions[0].id}")
        head = this
        total = len(head) + len(tail) + sample.max_new_tokens
        if total > lm.info.context_length:
            raise HeadwiseError(
                f"sample {sample.id} needs {total} tokens but {lm.name}'s context is {lm.info.context_length}; "
                "use a shorter length"
            )
        tails.append(tail)
    if head is None:
        raise HeadwiseError("a context needs at least one question")
    return head, tails


@dataclass(frozen=True)
class Answer:
    """One greedy answer: token ids, stripped text, its score, the time to feed the question and decode, and the
    fraction of the held cache its decoding steps read (1.0 but with decode-time selection)."""

    tokens: list[int]
    text: str
    score: float
    question_seconds: float
    decode_tokens_per_second: float
    read_fraction: float = 1.0


def answer(lm: LoadedModel, cache, tail: list[int], sample: Sample) -> Answer:
    """Answer ``sample`` from a copy of ``cache`` (sealed context): feed ``tail``, decode greedily, score."""
    cache = copy.deepcopy(cache)
    start = time.perf_counter()
    logits = prefill(lm.model, torch.tensor([tail]), cache)
    question_seconds = time.perf_counter() - start
    start = time.perf_counter()
    tokens = decode(lm.model, logits, cache, max_new_tokens=sample.max_new_tokens, sampling=Sampling(),
                    stop_ids=stop_token_ids(lm))
    seconds = time.perf_counter() - start
    text = lm.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    rate = (len(tokens) - 1) / seconds if seconds > 0 else 0.0
    read = cache.read_fraction() if hasattr(cache, "read_fraction") else 1.0
    return Answer(tokens, text, score(sample.scoring, text, sample.answers), question_seconds, rate, read)


def answer_nll(logits: torch.Tensor, reference: list[int]) -> tuple[float, float]:
    """Mean NLL per token of ``reference`` under ``logits`` [len(reference), vocab] and the fraction ranked first."""
    logp = logits.float().log_softmax(dim=-1)
    target = torch.tensor(reference)
    nll = -logp[torch.arange(len(reference)), target].mean().item()
    return nll, (logp.argmax(dim=-1) == target).float().mean().item()


@torch.inference_mode()
def follow(lm: LoadedModel, cache, tail: list[int], reference: list[int]) -> tuple[float, float]:
    """Mean NLL per token of ``reference`` teacher-forced after ``tail`` in a copy of ``cache``, and the
    fraction of its tokens that are the top choice. With decode-time selection the answer is fed a token at a
    time, as decoding reads it."""
    cache = copy.deepcopy(cache)
    if getattr(getattr(cache, "plan", None), "select", None) is not None:
        # decode-time selection acts on single-token steps: teacher-force the answer one token at a time
        logits = [forward(lm.model, cache, torch.tensor([tail]), logits_to_keep=1).logits[0, -1]]
        logits += [forward(lm.model, cache, torch.tensor([[t]])).logits[0, -1] for t in reference[:-1]]
        return answer_nll(torch.stack(logits), reference)
    ids = torch.tensor([tail + reference[:-1]])
    logits = forward(lm.model, cache, ids, logits_to_keep=len(reference)).logits[0]
    return answer_nll(logits, reference)
