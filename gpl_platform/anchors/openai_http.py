"""Anchors from an OpenAI-compatible HTTP server (vLLM, llama.cpp server, ...), standard library only.

POST ``{base_url}/chat/completions`` (default) or ``{base_url}/completions`` with the model name,
``logprobs`` when supported; requests run in a thread pool (``max_concurrency``); timeouts,
connection errors, 429 and 5xx are retried with exponential backoff, other 4xx fail at once; after
the last retry an :class:`AnchorBackendError` names the URL, the user and the last error.
If the server rejects ``logprobs`` the generator retries without it once and remembers; anchors
without token log-probabilities get logprob 0 and are counted in ``stats['logprobs_missing']``.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from .base import AnchorGenerator, RawAnchor, UserHistory, format_history
from .parser import parse_anchors
from ..prompts import DEFAULT_ANCHOR_PROMPT, PromptTemplate, load_prompt

logger = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class AnchorBackendError(RuntimeError):
    """The anchor server could not answer (after retries, or with a non-retryable error)."""


class _HTTPStatusError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status
        self.body = body


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
        max_tokens: int = 40,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = 0,
        max_history_items: int = 6,
        logprobs: bool = True,
        max_concurrency: int = 4,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        backoff_max_s: float = 8.0,
        on_error: str = "raise",
        pad_with_history: bool = False,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        if endpoint not in ("chat", "completions"):
            raise ValueError("endpoint must be 'chat' or 'completions'")
        if on_error not in ("raise", "fallback"):
            raise ValueError("on_error must be 'raise' or 'fallback'")
        self.base_url = base_url.rstrip("/")
        self.endpoint = endpoint
        self.template: PromptTemplate = load_prompt(prompt)
        self.model_id = model
        self.prompt_version = self.template.version
        self.api_key = api_key
        self.want_logprobs = logprobs
        self.max_concurrency = max(1, int(max_concurrency))
        self.timeout_s = float(timeout_s)
        self.max_retries = max(0, int(max_retries))
        self.backoff_s = float(backoff_s)
        self.backoff_max_s = float(backoff_max_s)
        self.on_error = on_error
        self.pad_with_history = pad_with_history
        self.extra_body = dict(extra_body or {})
        self.params: dict[str, Any] = {
            "endpoint": endpoint,
            "max_tokens": int(max_tokens),
            "temperature": float(temperature),
            "top_p": float(top_p),
            "seed": seed,
            "max_history_items": int(max_history_items),
            "extra_body": self.extra_body,
        }
        self._logprobs_supported = logprobs
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ request building
    @property
    def url(self) -> str:
        return f"{self.base_url}/{'chat/completions' if self.endpoint == 'chat' else 'completions'}"

    def build_body(self, hist: UserHistory, k: int, logprobs: bool) -> dict[str, Any]:
        block = format_history(
            hist, self.params["max_history_items"], genre_summary="Main genres:" in self.template.text
        )
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

    # ------------------------------------------------------------------ HTTP
    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            try:
                text = e.read().decode("utf-8", "replace")
            except Exception:  # noqa: BLE001
                text = ""
            raise _HTTPStatusError(e.code, text) from None

    def _request(self, hist: UserHistory, k: int, stats: Counter) -> dict[str, Any]:
        last: Exception | None = None
        attempt = 0
        while True:
            with self._lock:
                use_lp = self._logprobs_supported
            body = self.build_body(hist, k, use_lp)
            try:
                return self._post(body)
            except _HTTPStatusError as e:
                last = e
                if use_lp and e.status in (400, 422) and "logprob" in e.body.lower():
                    with self._lock:
                        if self._logprobs_supported:
                            logger.warning("server rejects logprobs; continuing without them (%s)", e)
                        self._logprobs_supported = False
                    with self._lock:
                        stats["logprobs_rejected"] += 1
                    continue
                if e.status not in RETRY_STATUS:
                    raise AnchorBackendError(
                        f"{self.url} answered HTTP {e.status} for user {hist.user_id}: {e.body[:300]}"
                    ) from None
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as e:
                last = e
            except json.JSONDecodeError as e:
                last = e
            if attempt >= self.max_retries:
                raise AnchorBackendError(
                    f"{self.url}: no answer for user {hist.user_id} after {attempt + 1} attempts "
                    f"(timeout {self.timeout_s}s); last error: {type(last).__name__}: {last}"
                )
            delay = min(self.backoff_max_s, self.backoff_s * (2**attempt)) * (0.5 + random.random() / 2)
            with self._lock:
                stats["http_retries"] += 1
            logger.info("retry %d for user %s in %.2fs after %s: %s", attempt + 1, hist.user_id, delay, type(last).__name__, last)
            time.sleep(delay)
            attempt += 1

    # ------------------------------------------------------------------ response parsing
    @staticmethod
    def _extract(resp: dict[str, Any], endpoint: str) -> tuple[str, list[tuple[int, int, float]] | None]:
        """Text of the first choice plus token (start, end, logprob) spans when present."""
        choices = resp.get("choices") or []
        if not choices:
            return "", None
        ch = choices[0]
        if endpoint == "chat":
            text = ((ch.get("message") or {}).get("content")) or ""
            lp = ch.get("logprobs") or {}
            content = lp.get("content") if isinstance(lp, dict) else None
            if not content:
                return text, None
            spans, pos = [], 0
            for t in content:
                tok = t.get("token", "")
                if isinstance(t.get("bytes"), list):
                    try:
                        tok = bytes(t["bytes"]).decode("utf-8", "replace")
                    except (ValueError, TypeError):
                        pass
                spans.append((pos, pos + len(tok), float(t.get("logprob", 0.0))))
                pos += len(tok)
            return text, spans
        text = ch.get("text") or ""
        lp = ch.get("logprobs") or {}
        toks, tlp = lp.get("tokens"), lp.get("token_logprobs")
        if not toks or not tlp:
            return text, None
        offs = lp.get("text_offset")
        spans, pos = [], 0
        base = offs[0] if offs else 0
        for j, (tok, l) in enumerate(zip(toks, tlp)):
            start = (offs[j] - base) if offs else pos
            spans.append((start, start + len(tok), float(l) if l is not None else 0.0))
            pos = start + len(tok)
        return text, spans

    def _one(self, hist: UserHistory, k: int, stats: Counter) -> list[RawAnchor] | None:
        try:
            resp = self._request(hist, k, stats)
        except AnchorBackendError:
            if self.on_error == "raise":
                raise
            logger.exception("user %s: anchor server failed, falling back", hist.user_id)
            with self._lock:
                stats["generation_errors"] += 1
            return None
        text, spans = self._extract(resp, self.endpoint)
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
                sel = [l for s, e, l in spans if s < a.end and e > a.start]
                if sel:
                    lp = sum(sel) / len(sel)
            out.append(RawAnchor(a.text, lp))
        return out

    def _generate_raw(self, histories: Sequence[UserHistory], k: int, progress: bool, stats: Counter):
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        results: list[list[RawAnchor] | None] = [None] * len(histories)
        bar = tqdm(total=len(histories), desc=f"anchors[{self.backend}]", unit="user", disable=not progress)
        try:
            with ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="anchors-http") as pool:
                futs = {pool.submit(self._one, h, k, stats): i for i, h in enumerate(histories)}
                try:
                    for fut in _as_completed(futs):
                        results[futs[fut]] = fut.result()
                        bar.update(1)
                except BaseException:
                    for f in futs:
                        f.cancel()
                    raise
        finally:
            bar.close()
        dt = time.perf_counter() - t0
        logger.info("openai: %d users in %.1fs (%.2f users/s) from %s", len(histories), dt, len(histories) / max(dt, 1e-9), self.url)
        return results


def _as_completed(futs):
    from concurrent.futures import as_completed

    return as_completed(futs)
