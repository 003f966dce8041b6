"""``LLMDecision``: one probability per archetype per decision step, asked of a language model.

For each of the K archetypes, the prompt is rendered with the archetype's profile and the step's
context, and the answer becomes a probability by the settings' ``probability_mode`` (see
:class:`~lpm_llm.llm.settings.LLMSettings`). All K archetypes (times ``n_samples``) are asked
concurrently, bounded by the client's ``concurrency``. An unusable answer is re-asked up to
``max_reasks`` times, each re-ask a new request (the unusable answer and a correction appended to
the messages, its own seed, the attempt index in the cache key); if none is usable, ``on_failure`` decides:
``raise`` an :class:`~lpm_llm.llm.errors.AnswerError`, or use ``fallback_probability`` for that
archetype. Every re-ask and fallback is counted in the client's ``usage`` and in ``records``.
HTTP failures (after the SDK's retries) and replay cache misses always raise.

Elicitation (``llm.elicitation``, :mod:`~lpm_llm.llm.elicitation`): ``few_shot`` worked examples
go before each question; with ``calibrate: content_free`` the content-free question is asked once
(cached like every answer, counted in the usage) and every probability has its bias divided out;
the raw probability is kept in the records (``raw_probability``), and ``prompt_version`` carries
the elicitation (e.g. ``a6c5bc73c8e8+fs2+cf``).

Unusable answers: text that does not parse (see :mod:`~lpm_llm.llm.parsing`); in ``logprobs``
mode, a first token whose yes+no probability mass is below ``min_answer_mass``; and a completion
without choices. A re-ask of a logprobs answer differs from it by its messages (the first token
it gave and a request for one word, Yes or No), which is what changes the token distribution: the
seed alone would not (the logprobs of a prompt do not depend on it). An empty completion is
re-asked with the original messages, a new seed and attempt index: a retry of the same question.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lpm_llm.core.behavior import PerArchetype
from lpm_llm.llm.client import LLMClient
from lpm_llm.llm.elicitation import calibrate, elicitation_tag
from lpm_llm.llm.errors import AnswerError, LLMSetupError, PromptError
from lpm_llm.llm.parsing import (
    PROBABILITY_FIELD,
    PROBABILITY_SCHEMA,
    ParseError,
    parse_probability,
    parse_yes_no,
    yes_no_mass,
    yes_probability_from_logprobs,
)
from lpm_llm.llm.prompts import PromptSpec
from lpm_llm.llm.protocol import ChatAnswer, ChatRequest
from lpm_llm.llm.settings import LLMSettings

log = logging.getLogger(__name__)

_JSON_INSTRUCTION = {
    "yes_no": "Instead of Yes or No, reply with only JSON {{\"{f}\": p}}, where p (0 to 1) is the "
    "probability that your answer is yes.",
    "probability": "Reply with only JSON {{\"{f}\": p}}, where p is a number from 0 to 1.",
}
_REASK = {
    "yes_no": "I could not read your answer ({why}). Answer with one word: Yes or No.",
    "probability": "I could not read your answer ({why}). Reply with only JSON {{\"{f}\": p}}, "
    "where p is a number from 0 to 1.",
}


# What the re-ask tells the model, by parse-failure reason (default: the reason in words).
_WHY = {"low_answer_mass": "it did not begin with Yes or No"}


class Archetypes(Protocol):
    """What LLMDecision needs of an archetype set: K, and each archetype's profile and description."""

    k: int
    profiles: list[dict[str, str]]
    descriptions: list[str]


@dataclass
class _Outcome:
    """One archetype's answer in one call."""

    probability: float
    calls: int = 0
    hits: int = 0
    reasks: int = 0
    fallback: bool = False
    answer: str = ""
    error: str = ""
    answer_mass: float | None = None
    raw_probability: float = float("nan")


@dataclass
class _Chain:
    """One sample's answer after re-asks: the parsed value or the last error."""

    value: Any = None
    calls: int = 0
    hits: int = 0
    reasks: int = 0
    texts: list[str] = field(default_factory=list)
    masses: list[float] = field(default_factory=list)  # logprobs mode: yes+no mass of each answer
    error: str = ""


class LLMDecision:
    """A :class:`~lpm_llm.core.behavior.DecisionSource` backed by a language model.

    Args:
        prompt: the decision's prompt (answer kind ``yes_no``; or ``probability`` with
            ``probability_mode: json``).
        client: an :class:`LLMClient` (see :func:`~lpm_llm.llm.client.open_client`).
        archetypes: anything with ``k``, ``profiles`` (K dicts of profile fields) and
            ``descriptions`` (K strings).
        settings: how answers become probabilities; default: the client's settings.

    Attributes:
        records: one dict per (call, archetype) with ``call`` (0, 1, ...), ``step``, ``date``,
            ``archetype``, ``description``, ``probability``, ``prompt``, ``prompt_version``,
            ``model``, ``mode``, ``cache_hit`` (every request for it came from the cache),
            ``requests`` (sent to the server), ``reasks``, ``fallback``, ``answer`` (a summary of
            the raw answers), ``raw_probability`` (before contextual calibration; equal to
            ``probability`` without it), ``content_free_probability`` (P(yes) of the content-free
            question, or None), ``answer_mass`` (logprobs mode: the first token's probability of
            reading yes or no in the answer used, or in the last answer when none was usable;
            None in the other modes) and ``error`` (why a fallback was used).
    """

    def __init__(
        self,
        prompt: PromptSpec,
        client: LLMClient,
        archetypes: Archetypes,
        settings: LLMSettings | None = None,
    ):
        self.prompt = prompt
        self.client = client
        self.archetypes = archetypes
        self.settings = settings if settings is not None else client.settings
        self.records: list[dict[str, Any]] = []
        self._calls = 0
        self.elicitation = self.settings.elicitation
        self.prompt_version = prompt.version + elicitation_tag(self.elicitation)
        self._content_free: float | None = None
        mode = self.settings.probability_mode
        if prompt.answer == "choice":
            raise ValueError(
                f"prompt {prompt.source} has answer 'choice'; LLMDecision gives one probability per "
                "archetype and needs a 'yes_no' (or 'probability') prompt"
            )
        if prompt.answer == "probability" and mode != "json":
            raise ValueError(
                f"prompt {prompt.source} asks for a probability; it needs llm.probability_mode 'json', "
                f"not {mode!r}"
            )
        k = archetypes.k
        if len(archetypes.profiles) != k or len(archetypes.descriptions) != k:
            raise ValueError(
                f"archetypes: k={k} but {len(archetypes.profiles)} profiles and "
                f"{len(archetypes.descriptions)} descriptions"
            )
        if mode == "samples" and self.settings.temperature == 0 and self.settings.n_samples > 1:
            log.warning(
                "samples mode at temperature 0: the %d samples will agree", self.settings.n_samples
            )

    # -- the DecisionSource interface ------------------------------------------------------------
    def probabilities(self, context: Mapping[str, Any]) -> torch.Tensor:
        """(K,) float32 probabilities of "yes", one per archetype, for this step's ``context``."""
        few = self.elicitation.few_shot
        try:
            messages = [self.prompt.render(self.variables(context, k), few) for k in range(self.archetypes.k)]
        except KeyError as e:  # a template variable that neither the profile nor the context holds
            raise PromptError(
                f"{e.args[0]}; this run supplies the archetype profile fields and the model's context: remove "
                "the variable from the prompt (templates and input_variables) or use a prompt written for "
                "this model"
            ) from None
        usage_before = (self.client.usage.calls, self.client.usage.cache_hits)
        asks = [self._ask(k, m) for k, m in enumerate(messages)]
        if self.elicitation.calibrate == "content_free" and self._content_free is None:
            asks.append(self._ask(-1, self.prompt.content_free(few)))  # once per decision, with the first step
        outcomes = self.client.run(_gather_or_cancel(asks))
        if len(outcomes) > self.archetypes.k:
            free = outcomes.pop()  # a fallback (on_failure: fallback) calibrates nothing: 1/2 shifts no logit
            self._content_free = 0.5 if free.fallback else free.probability
        for o in outcomes:
            o.raw_probability = o.probability
            if self._content_free is not None:
                o.probability = calibrate(o.probability, self._content_free)
        self._record(context, outcomes)
        u = self.client.usage
        log.info(
            "%s step %s: %d archetypes, %d answers (%d from cache), %d re-asks, %d fallbacks",
            self.prompt.name, context.get("step"), len(outcomes), u.calls - usage_before[0],
            u.cache_hits - usage_before[1], sum(o.reasks for o in outcomes),
            sum(o.fallback for o in outcomes),
        )
        return torch.tensor([o.probability for o in outcomes], dtype=torch.float32)

    def variables(self, context: Mapping[str, Any], k: int) -> dict[str, Any]:
        """The template variables of archetype k: its profile fields, ``description``, and the context."""
        profile = dict(self.archetypes.profiles[k])
        profile.setdefault("description", self.archetypes.descriptions[k])
        values = dict(profile)
        for key, value in context.items():
            if key in profile:
                raise ValueError(
                    f"context key {key!r} clashes with an archetype profile field; "
                    f"profile fields: {sorted(profile)}"
                )
            if isinstance(value, PerArchetype):
                if len(value) != self.archetypes.k:
                    raise ValueError(
                        f"context[{key!r}] is PerArchetype of length {len(value)}, "
                        f"expected k={self.archetypes.k}"
                    )
                value = value[k]
            if isinstance(value, torch.Tensor):
                value = value.item()
            values[key] = value
        return values

    # -- asking ----------------------------------------------------------------------------------
    async def _ask(self, k: int, messages: list[dict[str, str]]) -> _Outcome:
        s = self.settings
        base = tuple((m["role"], m["content"]) for m in messages)
        who = "the content-free question" if k < 0 else f"archetype {k} ({self.archetypes.descriptions[k]!r})"
        label = f"prompt {self.prompt.name!r} (version {self.prompt_version}), {who}"
        if s.probability_mode == "samples":
            samples = [self._chain(base, label, i, _yes_no) for i in range(s.n_samples)]
            chains = await _gather_or_cancel(samples)
        elif s.probability_mode == "logprobs":
            chains = [await self._chain(base, label, 0, _logprob_yes(s.min_answer_mass))]
        else:
            instruction = _JSON_INSTRUCTION[self.prompt.answer].format(f=PROBABILITY_FIELD)
            role, content = base[-1]
            base = base[:-1] + ((role, f"{content}\n{instruction}"),)
            chains = [await self._chain(base, label, 0, _stated)]
        outcome = _Outcome(
            probability=float("nan"),
            calls=sum(c.calls for c in chains),
            hits=sum(c.hits for c in chains),
            reasks=sum(c.reasks for c in chains),
            answer_mass=chains[0].masses[-1] if chains[0].masses else None,
        )
        failed = [c for c in chains if c.error]
        if failed:
            message = f"{label}: no usable answer after {s.max_reasks} re-asks; {failed[0].error}"
            if s.on_failure == "raise":
                raise AnswerError(
                    message + "; set llm.on_failure: fallback (with llm.fallback_probability) to go on"
                )
            log.warning("%s; using fallback_probability %s", message, s.fallback_probability)
            self.client.usage.fallbacks += 1
            outcome.probability = float(s.fallback_probability)
            outcome.fallback, outcome.error = True, message
            outcome.answer = " | ".join(c.texts[-1] for c in failed)[:500]
            return outcome
        values = [c.value for c in chains]
        if s.probability_mode == "samples":
            outcome.probability = sum(values) / len(values)
            outcome.answer = f"{sum(values)}/{len(values)} yes"
        else:
            outcome.probability = float(values[0])
            outcome.answer = chains[0].texts[-1][:200]
        return outcome

    async def _chain(
        self, base: tuple[tuple[str, str], ...], label: str, sample: int, parse: Callable[[ChatAnswer], Any]
    ) -> _Chain:
        """Ask (sample `sample`), re-asking while the answer is unusable, at most ``max_reasks`` times."""
        s = self.settings
        chain = _Chain()
        messages = base
        for attempt in range(s.max_reasks + 1):
            answer = await self.client.acomplete(self._request(messages, label, sample, attempt))
            chain.calls += 1
            chain.hits += answer.cache_hit
            chain.texts.append(answer.text)
            if answer.top_logprobs is not None and s.probability_mode == "logprobs":
                chain.masses.append(sum(yes_no_mass(answer.top_logprobs)))
            try:
                if answer.empty:
                    raise ParseError("no_choices", f"the LLM endpoint {self.client.endpoint} returned a "
                                                   "completion without choices")
                chain.value = parse(answer)
                chain.error = ""
                return chain
            except ParseError as err:
                chain.error = f"last answer {answer.text[:200]!r} ({err})"
                if attempt == s.max_reasks:
                    break
                chain.reasks += 1
                self.client.usage.reasks += 1
                log.info("%s sample %d: re-asking (%s)", label, sample, err)
                if answer.empty:  # nothing to correct: ask the same question again
                    messages = base
                    continue
                kind = "yes_no" if s.probability_mode != "json" else "probability"
                why = _WHY.get(err.reason, err.reason.replace("_", " "))
                fix = _REASK[kind].format(why=why, f=PROBABILITY_FIELD)
                messages = base + (("assistant", answer.text), ("user", fix))
        return chain

    def _request(
        self, messages: tuple[tuple[str, str], ...], label: str, sample: int, attempt: int
    ) -> ChatRequest:
        s = self.settings
        mode = s.probability_mode
        response_format = None
        if mode == "json" and s.json_format == "json_object_schema":
            response_format = {"type": "json_object", "schema": PROBABILITY_SCHEMA}
        elif mode == "json" and s.json_format == "json_object":
            response_format = {"type": "json_object"}
        return ChatRequest(
            model=s.model_name,
            messages=messages,
            temperature=s.temperature,
            max_tokens=1 if mode == "logprobs" else s.max_tokens,
            # each sample and re-ask its own seed, so that sampled answers differ yet repeat exactly
            # (n_samples <= 1000: re-ask seeds never coincide with another sample's)
            seed=None if s.seed is None else s.seed + sample + 1000 * attempt,
            logprobs=mode == "logprobs",
            top_logprobs=s.top_logprobs if mode == "logprobs" else None,
            response_format=response_format,
            sample=sample,
            attempt=attempt,
            label=label,
        )

    def _record(self, context: Mapping[str, Any], outcomes: Sequence[_Outcome]) -> None:
        call = self._calls
        self._calls += 1
        for k, o in enumerate(outcomes):
            self.records.append({
                "call": call,
                "step": context.get("step"),
                "date": None if context.get("date") is None else str(context.get("date")),
                "archetype": k,
                "description": self.archetypes.descriptions[k],
                "probability": o.probability,
                "raw_probability": o.raw_probability,
                "content_free_probability": self._content_free,
                "prompt": self.prompt.name,
                "prompt_version": self.prompt_version,
                "model": self.settings.model_name,
                "mode": self.settings.probability_mode,
                "cache_hit": o.hits == o.calls,
                "requests": o.calls - o.hits,
                "reasks": o.reasks,
                "fallback": o.fallback,
                "answer": o.answer,
                "answer_mass": o.answer_mass,
                "error": o.error,
            })


def _yes_no(answer: ChatAnswer) -> int:
    return int(parse_yes_no(answer.text))


def _logprob_yes(min_mass: float) -> Callable[[ChatAnswer], float]:
    def parse(answer: ChatAnswer) -> float:
        if answer.top_logprobs is None:
            raise LLMSetupError(
                "the LLM endpoint returned no logprobs; it may not support them: set llm.probability_mode "
                "to samples or json"
            )
        return yes_probability_from_logprobs(answer.top_logprobs, min_mass)

    return parse


def _stated(answer: ChatAnswer) -> float:
    return parse_probability(answer.text)


async def _gather_or_cancel(coros: Sequence[Coroutine[Any, Any, Any]]) -> list[Any]:
    """Run concurrently; on the first error cancel the rest (and wait for them), then raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
