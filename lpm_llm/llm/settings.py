"""``LLMSettings``: how the decision layer talks to a language model (the ``llm:`` block of an experiment)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lpm_llm.llm.elicitation import Elicitation

#: Model name sent to the embedded llama.cpp server (it serves one model under this alias).
LOCAL_MODEL = "SmolLM2-135M-Instruct"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lpm_llm/llm`` (``~/.cache/lpm_llm/llm``): shared by runs so reruns are free."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "lpm_llm" / "llm"


class LLMSettings(BaseModel):
    """Settings of the LLM client and of how answers become probabilities.

    The API key itself is never part of the settings: ``api_key_env`` names the environment
    variable that holds it, so that configs, caches, logs and outputs stay free of secrets.

    Probability modes (one probability per archetype and decision step):

    - ``samples``: ``n_samples`` independent yes/no answers (``n=1`` each, sample index in the
      cache key and in the seed); the probability is the fraction of "yes".
    - ``logprobs``: one request with ``max_tokens=1``, ``logprobs=True``; P(yes) is the
      probability mass of first tokens that read "yes", renormalised against those that read "no".
      The yes+no mass itself is recorded per answer (``answer_mass``); below ``min_answer_mass``
      the answer is unusable (re-asked, then ``on_failure``). The default 0.5 asks that yes or no
      be the model's most likely reading, more likely than everything else together: below it,
      the renormalised number describes a minority of what the model would say.
    - ``json``: the model states a probability; ``json_format`` says how the output format is
      requested (``json_object_schema``: ``{"type": "json_object", "schema": ...}``, understood by
      the llama.cpp server; ``json_object``: OpenAI-style JSON mode; ``none``: plain text, parsed).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: Literal["local", "openai"] = "local"
    model: str | None = Field(None, description="model name; default for provider local: " + LOCAL_MODEL)
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str = "OPENAI_API_KEY"
    probability_mode: Literal["samples", "logprobs", "json"] = "logprobs"
    json_format: Literal["json_object_schema", "json_object", "none"] = "json_object_schema"
    n_samples: int = Field(10, ge=1, le=1000)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    max_tokens: int = Field(24, ge=1, le=4096)
    top_logprobs: int = Field(20, ge=1, le=20)
    min_answer_mass: float = Field(
        0.5, ge=0.0, le=1.0, description="logprobs mode: least first-token probability of yes+no for a usable answer"
    )
    concurrency: int = Field(4, ge=1, le=1024)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0, le=20)
    max_reasks: int = Field(2, ge=0, le=20)
    on_failure: Literal["raise", "fallback"] = "raise"
    fallback_probability: float | None = Field(None, ge=0.0, le=1.0)
    cache_dir: str | None = Field(None, description="answer cache folder; default: default_cache_dir()")
    cache_mode: Literal["readwrite", "replay", "off"] = "readwrite"
    cache_namespace: str | None = Field(
        None, description="part of every cache key: answers are shared only within a namespace (e.g. per host)"
    )
    local_backend: Literal["inprocess", "server"] = Field(
        "inprocess", description="provider local: llama_cpp.Llama in this process, or a llama.cpp server child"
    )
    local_weights: Literal["f32", "file"] = Field(
        "f32", description="provider local, inprocess: the weights in float32 (the same weights, faster) or as stored"
    )
    threads: int | None = Field(
        None, ge=1, le=256,
        description="provider local: llama.cpp CPU threads (answers do not change); default: every core if the "
        "machine is idle when the model loads (1-minute load average below 0.5), else 1",
    )
    seed: int | None = Field(0, ge=0, description="base seed sent with requests; None sends none")
    elicitation: Elicitation = Field(
        default_factory=Elicitation,
        description="few-shot framing and contextual calibration (lpm_llm.llm.elicitation); default: neither",
    )

    @model_validator(mode="after")
    def _check(self) -> LLMSettings:
        if self.on_failure == "fallback" and self.fallback_probability is None:
            raise ValueError(
                "llm.on_failure is 'fallback' but llm.fallback_probability is not set (a value in [0, 1])"
            )
        if self.provider == "openai" and not self.model:
            raise ValueError("llm.model is required for provider 'openai' (e.g. gpt-4o-mini)")
        return self

    @property
    def model_name(self) -> str:
        """The model name sent in requests (and part of every cache key)."""
        return self.model or LOCAL_MODEL

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()
