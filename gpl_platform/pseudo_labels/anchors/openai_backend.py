"""Anchors from an OpenAI-compatible server (vLLM, llama.cpp server, a hosted endpoint) through the
official ``openai`` Python SDK.

* One ``openai.OpenAI`` client per generator, on one HTTP connection pool sized to
  ``max_concurrency`` (connections are reused across users); requests run in a thread pool of the
  same size, so at most ``max_concurrency`` are in flight.
* The API key comes from ``api_key`` or the environment variable ``api_key_env`` (default
  ``OPENAI_API_KEY``); it is never logged, never part of the cache signature, and servers that need
  none get a placeholder.
* Retries are the SDK's: timeouts, connection errors, 408/409/429 and 5xx, with exponential backoff
  that honours the server's ``Retry-After`` (up to the SDK's two minutes). Every retried answer is
  counted (``http_retries``, ``http_status_<code>``).
* ``extra_body`` is merged into every request (e.g. vLLM's ``top_k`` or ``guided_regex``).
* A user whose request still fails falls back to its history, counted by cause
  (``openai_failed_<reason>``: ``rate_limited``, ``server_error``, ``timeout``, ``connection_error``,
  ``malformed_response``, ``http_<status>``); more than ``max_failure_share`` of the users failing, or
  an answer that cannot improve with retries (401, 403, 404: key, permission, model or URL), raises
  :class:`AnchorBackendError`. ``on_error="raise"`` raises on the first failed user instead.
* If the server rejects ``logprobs`` the generator asks again without it and remembers; anchors
  without token log-probabilities get logprob 0 and are counted in ``stats['logprobs_missing']``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from gpl_platform.pseudo_labels.anchors.base import AnchorGenerator, RawAnchor, UserHistory
from gpl_platform.pseudo_labels.anchors.parser import parse_anchors
from gpl_platform.pseudo_labels.anchors.prompt_budget import ApproxTokenizer, PromptBudget, bounded_history_block
from gpl_platform.pseudo_labels.prompts import DEFAULT_ANCHOR_PROMPT, PromptTemplate, load_prompt

logger = logging.getLogger(__name__)

#: answers that retrying cannot fix: the run stops at once with a clear error
FATAL_STATUS = {401, 403, 404}
#: stands in for the key of servers that need none (the SDK always sends one)
NO_KEY = "no-key-configured"


class AnchorBackendError(RuntimeError):
    """The anchor server could not answer (after retries, or with an error retries cannot fix)."""


class _Malformed(Exception):
    """The server answered 200 with something that is not a completion."""


class OpenAICompatibleAnchorGenerator(AnchorGenerator):
    backend = "openai"

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000/v1",
        model: str = "default",
        *,
        endpoint: str = "chat",
        prompt: str | Path = DEFAULT_ANCHOR_PROMPT,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        max_tokens: int = 40,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = 0,
        max_history_items: int = 6,
        logprobs: bool = True,
        max_concurrency: int = 4,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        max_retries: int = 3,
        on_error: str = "fallback",
        max_failure_share: float = 0.5,
        pad_with_history: bool = False,
        extra_body: dict[str, Any] | None = None,
        budget: PromptBudget | None = None,
    ) -> None:
        if endpoint not in ("chat", "completions"):
            raise ValueError("endpoint must be 'chat' or 'completions'")
        if on_error not in ("raise", "fallback"):
            raise ValueError("on_error must be 'raise' or 'fallback'")
        if not 0 <= max_failure_share <= 1:
            raise ValueError("max_failure_share must be in [0, 1]")
        self.base_url = base_url.rstrip("/")
        self.endpoint = endpoint
        self.template: PromptTemplate = load_prompt(prompt)
        self.model_id = model
        self.prompt_version = self.template.version
        self._api_key = api_key or os.environ.get(api_key_env) or None
        self.want_logprobs = logprobs
        self.max_concurrency = max(1, int(max_concurrency))
        self.timeout_s = float(timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.max_retries = max(0, int(max_retries))
        self.on_error = on_error
        self.max_failure_share = float(max_failure_share)
        self.pad_with_history = pad_with_history
        self.extra_body = dict(extra_body or {})
        self.budget = budget or PromptBudget()
        self.params: dict[str, Any] = {
            "endpoint": endpoint,
            "max_tokens": int(max_tokens),
            "temperature": float(temperature),
            "top_p": float(top_p),
            "seed": seed,
            "max_history_items": int(max_history_items),
            "extra_body": self.extra_body,
            **self.budget.as_params(),
        }
        self._logprobs_supported = logprobs
        self._lock = threading.Lock()
        self._client: Any = None
        self._tokenizer = ApproxTokenizer()
        self._fixed_tokens: dict[int, int] = {}
        self._live_stats: Counter | None = None  # the stats of the generate() call in progress

    def __repr__(self) -> str:  # the key stays out of every rendering of the generator
        return (
            f"OpenAICompatibleAnchorGenerator(base_url={self.base_url!r}, model={self.model_id!r}, "
            f"api_key={'set' if self._api_key else 'none'}, params={self.params!r})"
        )

    @property
    def url(self) -> str:
        return f"{self.base_url}/{'chat/completions' if self.endpoint == 'chat' else 'completions'}"

    # ------------------------------------------------------------------ client
    def client(self):
        """The SDK client (built once; its connection pool is reused by every request)."""
        with self._lock:
            if self._client is None:
                import httpx2
                import openai

                def on_request(request) -> None:  # every attempt, retries included
                    self._count("http_requests")

                def on_response(response) -> None:
                    if response.status_code >= 400:
                        self._count(f"http_status_{response.status_code}")

                timeout = httpx2.Timeout(self.timeout_s, connect=self.connect_timeout_s)
                http = openai.DefaultHttpx2Client(
                    limits=httpx2.Limits(
                        max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
                    ),
                    timeout=timeout,
                    event_hooks={"request": [on_request], "response": [on_response]},
                )
                self._client = openai.OpenAI(
                    base_url=self.base_url,
                    api_key=self._api_key or NO_KEY,
                    max_retries=self.max_retries,
                    timeout=timeout,
                    http_client=http,
                )
            return self._client

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            if self._live_stats is not None:
                self._live_stats[key] += n

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # ------------------------------------------------------------------ request building
    def _fixed(self, k: int) -> int:
        """Estimated tokens of the prompt without the history block (per k)."""
        if k not in self._fixed_tokens:
            if self.endpoint == "chat":
                text = "".join(m["content"] for m in self.template.chat_messages(k, ""))
            else:
                text = self.template.as_completion_text(k, "")
            self._fixed_tokens[k] = len(self._tokenizer.encode(text))
        return self._fixed_tokens[k]

    def history_block(self, hist: UserHistory, k: int, stats: Counter | None = None) -> str:
        return bounded_history_block(
            hist,
            self.params["max_history_items"],
            self.budget,
            self._tokenizer,
            self._fixed(k),
            stats,
            genre_summary="Main genres:" in self.template.text,
        )

    def build_body(self, hist: UserHistory, k: int, logprobs: bool, stats: Counter | None = None) -> dict[str, Any]:
        """The request's fields (what the SDK sends; ``extra_body`` merged last)."""
        block = self.history_block(hist, k, stats)
        body: dict[str, Any] = {
            "model": self.model_id,
            "max_tokens": self.params["max_tokens"],
            "temperature": self.params["temperature"],
            "top_p": self.params["top_p"],
        }
        if self.params["seed"] is not None:
            body["seed"] = self.params["seed"]
        if self.endpoint == "chat":
            body["messages"] = self.template.chat_messages(k, block)
            if logprobs:
                body["logprobs"] = True
        else:
            body["prompt"] = self.template.as_completion_text(k, block)
            body["stop"] = ["\n\n\n", "User:"]
            if logprobs:
                body["logprobs"] = 1
        body.update(self.extra_body)
        return body

    # ------------------------------------------------------------------ one request
    def _call(self, body: dict[str, Any]) -> dict[str, Any]:
        client = self.client()
        fields = dict(body)
        known = {
            "model",
            "max_tokens",
            "temperature",
            "top_p",
            "seed",
            "logprobs",
            "stop",
            "messages" if self.endpoint == "chat" else "prompt",
        }
        extra = {k: fields.pop(k) for k in list(fields) if k not in known}
        api = client.chat.completions if self.endpoint == "chat" else client.completions
        self._count("api_calls")
        response = api.create(**fields, extra_body=extra or None)
        resp = response.model_dump() if hasattr(response, "model_dump") else response
        if not isinstance(resp, dict) or not isinstance(resp.get("choices"), list) or not resp["choices"]:
            raise _Malformed(f"no choices in the answer: {str(resp)[:200]}")
        return resp

    def _request(self, hist: UserHistory, k: int, stats: Counter) -> dict[str, Any]:
        import openai

        while True:
            with self._lock:
                use_lp = self._logprobs_supported
            try:
                return self._call(self.build_body(hist, k, use_lp, stats))
            except openai.BadRequestError as e:
                if use_lp and "logprob" in str(e).lower():
                    with self._lock:
                        if self._logprobs_supported:
                            logger.warning("%s rejects logprobs; continuing without them", self.url)
                        self._logprobs_supported = False
                        stats["logprobs_rejected"] += 1
                    continue
                raise

    @staticmethod
    def failure_reason(exc: BaseException) -> str:
        import openai

        if isinstance(exc, openai.RateLimitError):
            return "rate_limited"
        if isinstance(exc, openai.APITimeoutError):
            return "timeout"
        if isinstance(exc, openai.APIConnectionError):
            return "connection_error"
        if isinstance(exc, openai.APIStatusError):
            return "server_error" if exc.status_code >= 500 else f"http_{exc.status_code}"
        return "malformed_response"  # _Malformed, validation and decoding errors of a 200 answer

    # ------------------------------------------------------------------ response parsing
    @staticmethod
    def _extract(resp: dict[str, Any], endpoint: str) -> tuple[str, list[tuple[int, int, float]] | None]:
        """Text of the first choice plus token (start, end, logprob) spans when present."""
        ch = resp["choices"][0] or {}
        if endpoint == "chat":
            text = (ch.get("message") or {}).get("content")
            if not isinstance(text, str):
                raise _Malformed("the first choice has no message content")
            lp = ch.get("logprobs") or {}
            content = lp.get("content") if isinstance(lp, dict) else None
            if not content:
                return text, None
            spans, pos = [], 0
            for t in content:
                tok = t.get("token") or ""
                if isinstance(t.get("bytes"), list):
                    try:
                        tok = bytes(t["bytes"]).decode("utf-8", "replace")
                    except (ValueError, TypeError):
                        pass
                spans.append((pos, pos + len(tok), float(t.get("logprob") or 0.0)))
                pos += len(tok)
            return text, spans
        text = ch.get("text")
        if not isinstance(text, str):
            raise _Malformed("the first choice has no text")
        lp = ch.get("logprobs") or {}
        toks, tlp = lp.get("tokens"), lp.get("token_logprobs")
        if not toks or not tlp:
            return text, None
        offs = lp.get("text_offset")
        spans, pos = [], 0
        base = offs[0] if offs else 0
        for j, (tok, logprob) in enumerate(zip(toks, tlp)):
            start = (offs[j] - base) if offs else pos
            spans.append((start, start + len(tok), float(logprob) if logprob is not None else 0.0))
            pos = start + len(tok)
        return text, spans

    def _one(self, hist: UserHistory, k: int, stats: Counter) -> list[RawAnchor] | None:
        import openai

        try:
            resp = self._request(hist, k, stats)
            text, spans = self._extract(resp, self.endpoint)
        except (openai.OpenAIError, _Malformed, ValueError) as exc:
            reason = self.failure_reason(exc)
            status = getattr(exc, "status_code", None)
            message = (
                f"{self.url}: no anchors for user {hist.user_id} ({reason}, after up to "
                f"{self.max_retries} retries, timeout {self.timeout_s}s): {type(exc).__name__}: {exc}"
            )
            if status in FATAL_STATUS:
                raise AnchorBackendError(message + " -- check the base URL, model name and API key") from None
            if self.on_error == "raise":
                raise AnchorBackendError(message) from None
            logger.warning("%s; falling back to the history", message)
            with self._lock:
                stats["generation_errors"] += 1
                stats[f"openai_failed_{reason}"] += 1
            return None
        parsed = parse_anchors(text, k, hist.item_texts)
        out = []
        with self._lock:
            for reason, n in parsed.dropped.items():
                stats[f"parse_{reason}"] += n
            usage = resp.get("usage") or {}
            stats["generated_tokens"] += int(usage.get("completion_tokens") or 0)
            if spans is None and parsed.anchors:
                stats["logprobs_missing"] += len(parsed.anchors)
        for a in parsed.anchors:
            lp = 0.0
            if spans:
                sel = [span_lp for s, e, span_lp in spans if s < a.end and e > a.start]
                if sel:
                    lp = sum(sel) / len(sel)
            out.append(RawAnchor(a.text, lp))
        return out

    def _generate_raw(self, histories: Sequence[UserHistory], k: int, progress: bool, stats: Counter):
        from tqdm.auto import tqdm

        self.client()
        with self._lock:
            self._live_stats = stats
        t0 = time.perf_counter()
        results: list[list[RawAnchor] | None] = [None] * len(histories)
        bar = tqdm(total=len(histories), desc=f"anchors[{self.backend}]", unit="user", disable=not progress)
        try:
            with ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="anchors-http") as pool:
                futs = {pool.submit(self._one, h, k, stats): i for i, h in enumerate(histories)}
                try:
                    for fut in as_completed(futs):
                        results[futs[fut]] = fut.result()
                        bar.update(1)
                except BaseException:
                    for f in futs:
                        f.cancel()
                    raise
        finally:
            bar.close()
            with self._lock:
                self._live_stats = None
        stats["http_retries"] = max(0, stats.get("http_requests", 0) - stats.get("api_calls", 0))
        failed = stats.get("generation_errors", 0)
        dt = time.perf_counter() - t0
        logger.info(
            "openai: %d users in %.1fs (%.2f users/s) from %s, %d failed",
            len(histories),
            dt,
            len(histories) / max(dt, 1e-9),
            self.url,
            failed,
        )
        if histories and failed / len(histories) > self.max_failure_share:
            raise AnchorBackendError(
                f"{self.url}: {failed} of {len(histories)} users got no answer (more than max_failure_share "
                f"{self.max_failure_share}): "
                f"{dict((k_, v) for k_, v in stats.items() if k_.startswith('openai_failed_'))}"
            )
        return results
