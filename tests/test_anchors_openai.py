"""OpenAI-compatible backend against a stub HTTP server on 127.0.0.1 (free port, threads)."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gpl_platform.anchors import UserHistory
from gpl_platform.anchors.openai_http import AnchorBackendError, OpenAICompatibleAnchorGenerator

TEXTS = (
    "Toy Story (1995). Genres: Animation, Children's, Comedy",
    "Star Wars (1977). Genres: Action, Adventure, Romance, Sci-Fi, War",
    "Fargo (1996). Genres: Crime, Drama, Thriller",
)


def hist(uid: str) -> UserHistory:
    return UserHistory(uid, ("1", "2", "3"), TEXTS)


def chat_payload(text: str, token_logprob: float | None = -0.25) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if token_logprob is not None:
        # split into word-ish tokens whose concatenation is the text
        toks, cur = [], ""
        for ch in text:
            cur += ch
            if ch in " \n":
                toks.append(cur)
                cur = ""
        if cur:
            toks.append(cur)
        choice["logprobs"] = {"content": [{"token": t, "logprob": token_logprob, "bytes": list(t.encode())} for t in toks]}
    return {"id": "x", "object": "chat.completion", "choices": [choice], "usage": {"completion_tokens": 7}}


class Stub:
    """Starts a threaded server; `behavior(n, path, body) -> (status, payload, delay_s)`."""

    def __init__(self, behavior):
        self.behavior = behavior
        self.requests: list[tuple[str, dict]] = []
        self.inflight = 0
        self.max_inflight = 0
        self.lock = threading.Lock()
        stub = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with stub.lock:
                    n = len(stub.requests)
                    stub.requests.append((self.path, body))
                    stub.inflight += 1
                    stub.max_inflight = max(stub.max_inflight, stub.inflight)
                try:
                    status, payload, delay = stub.behavior(n, self.path, body)
                    if delay:
                        time.sleep(delay)
                    data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                    try:
                        self.send_response(status)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                finally:
                    with stub.lock:
                        stub.inflight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def make(stub: Stub, **kw) -> OpenAICompatibleAnchorGenerator:
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("timeout_s", 5.0)
    return OpenAICompatibleAnchorGenerator(stub.base_url, "stub-model", **kw)


def test_chat_success_with_logprobs_and_request_shape():
    text = "- space opera adventure\n- dark crime drama\n- Fargo (1996)"
    with Stub(lambda n, p, b: (200, chat_payload(text), 0)) as stub:
        gen = make(stub, max_concurrency=2)
        res = gen.generate([hist("a"), hist("b")], k=3, progress=False)
    df = res.anchors
    assert df[df.user_id == "a"].anchor_text.tolist() == ["space opera adventure", "dark crime drama"]
    assert df.logprob.round(6).eq(-0.25).all()
    assert df.gen_prob.round(6).eq(round(math.exp(-0.25), 6)).all()
    assert not df.is_fallback.any()
    assert res.stats["llm_anchors"] == 4 and res.stats["parse_copied_title"] == 2
    assert res.stats["generated_tokens"] == 14
    path, body = stub.requests[0]
    assert path == "/v1/chat/completions"
    assert body["model"] == "stub-model" and body["logprobs"] is True
    assert body["messages"][0]["role"] == "system"
    last = body["messages"][-1]["content"]
    assert "Toy Story: Animation, Children's, Comedy" in last  # compact: no year
    assert last.endswith("Main genres: Animation, Children's, Comedy")  # ties: first seen


def test_retries_5xx_then_success():
    def behavior(n, path, body):
        if n < 2:
            return 503, {"error": "overloaded"}, 0
        return 200, chat_payload("- heist thriller"), 0

    with Stub(behavior) as stub:
        res = make(stub, max_retries=3, max_concurrency=1).generate([hist("a")], k=2, progress=False)
    assert res.anchors.anchor_text.tolist() == ["heist thriller"]
    assert res.stats["http_retries"] == 2
    assert len(stub.requests) == 3


def test_timeout_raises_clear_error_after_retries():
    with Stub(lambda n, p, b: (200, chat_payload("- late"), 1.5)) as stub:
        gen = make(stub, timeout_s=0.2, max_retries=1)
        t0 = time.time()
        with pytest.raises(AnchorBackendError, match=r"after 2 attempts.*timeout 0.2s"):
            gen.generate([hist("a")], k=2, progress=False)
        assert time.time() - t0 < 5
        assert len(stub.requests) == 2


def test_timeout_with_fallback_policy_counts_and_falls_back():
    with Stub(lambda n, p, b: (200, chat_payload("- late"), 1.0)) as stub:
        gen = make(stub, timeout_s=0.2, max_retries=0, on_error="fallback")
        res = gen.generate([hist("a")], k=2, progress=False)
    assert res.anchors.is_fallback.all()
    assert res.anchors.fallback_reason.eq("generation_error").all()
    assert res.stats["fallback_generation_error"] == 1 and res.stats["generation_errors"] == 1


def test_non_retryable_4xx_fails_fast():
    with Stub(lambda n, p, b: (401, {"error": "bad key"}, 0)) as stub:
        with pytest.raises(AnchorBackendError, match="HTTP 401"):
            make(stub, max_retries=5).generate([hist("a")], k=2, progress=False)
        assert len(stub.requests) == 1


def test_connection_refused_is_retried_then_errors():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    gen = OpenAICompatibleAnchorGenerator(f"http://127.0.0.1:{port}/v1", "m", max_retries=2, backoff_s=0.01)
    with pytest.raises(AnchorBackendError, match="after 3 attempts"):
        gen.generate([hist("a")], k=2, progress=False)


def test_logprobs_rejected_then_retried_without():
    def behavior(n, path, body):
        if body.get("logprobs"):
            return 400, {"error": {"message": "logprobs is not supported"}}, 0
        return 200, chat_payload("- cozy mystery", token_logprob=None), 0

    with Stub(behavior) as stub:
        gen = make(stub)
        res = gen.generate([hist("a"), hist("b")], k=2, progress=False)
    assert res.anchors.anchor_text.tolist() == ["cozy mystery", "cozy mystery"]
    assert (res.anchors.logprob == 0.0).all() and (res.anchors.gen_prob == 1.0).all()
    assert res.stats["logprobs_missing"] == 2 and res.stats["logprobs_rejected"] >= 1


def test_completions_endpoint_parses_token_logprobs():
    text = " space opera\n- noir detective"

    def behavior(n, path, body):
        toks = [" space", " opera", "\n", "-", " noir", " detective"]
        offs, pos = [], 100
        for t in toks:
            offs.append(pos)
            pos += len(t)
        return 200, {"choices": [{"text": text, "logprobs": {
            "tokens": toks, "token_logprobs": [-0.1, -0.3, -1.0, -1.0, -0.5, -0.7], "text_offset": offs}}]}, 0

    with Stub(behavior) as stub:
        res = make(stub, endpoint="completions").generate([hist("a")], k=3, progress=False)
        path, body = stub.requests[0]
    assert path == "/v1/completions" and body["logprobs"] == 1 and body["prompt"].endswith("Assistant: -")
    df = res.anchors
    assert df.anchor_text.tolist() == ["space opera", "noir detective"]
    assert df.logprob.round(6).tolist() == [-0.2, -0.6]


def test_concurrency_and_order_preserved():
    def behavior(n, path, body):
        return 200, chat_payload(f"- anchor {n}"), 0.2

    hs = [hist(f"u{i}") for i in range(8)]
    with Stub(behavior) as stub:
        t0 = time.time()
        res = make(stub, max_concurrency=4).generate(hs, k=2, progress=False)
        dt = time.time() - t0
    assert stub.max_inflight >= 2
    assert dt < 8 * 0.2  # not serial
    assert res.anchors.user_id.tolist() == [h.user_id for h in hs]


def test_garbage_server_output_falls_back_to_history():
    outs = ["", "Sure! Here you go:", "\x00\x01???", "- Star Wars (1977)"]
    with Stub(lambda n, p, b: (200, chat_payload(outs[n % 4]), 0)) as stub:
        res = make(stub, max_concurrency=1).generate([hist(f"u{i}") for i in range(4)], k=2, progress=False)
    df = res.anchors
    assert df.groupby("user_id").size().min() >= 1
    assert df.is_fallback.all()
    assert res.stats["fallback_no_usable_output"] == 4


def test_signature_changes_with_params():
    a = OpenAICompatibleAnchorGenerator("http://127.0.0.1:1/v1", "m")
    b = OpenAICompatibleAnchorGenerator("http://127.0.0.1:1/v1", "m", temperature=0.7)
    c = OpenAICompatibleAnchorGenerator("http://127.0.0.1:2/v1", "m")
    assert a.cache_signature() != b.cache_signature()
    assert a.cache_signature() == c.cache_signature()  # the URL does not change the output
