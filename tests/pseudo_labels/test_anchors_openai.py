"""OpenAI-compatible backend (the official SDK) against a stub HTTP server on 127.0.0.1 (free port, threads,
HTTP/1.1 keep-alive so that connection reuse is visible)."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gpl_platform.pseudo_labels.anchors import UserHistory
from gpl_platform.pseudo_labels.anchors.openai_backend import AnchorBackendError, OpenAICompatibleAnchorGenerator

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
        choice["logprobs"] = {
            "content": [{"token": t, "logprob": token_logprob, "bytes": list(t.encode())} for t in toks]
        }
    return {"id": "x", "object": "chat.completion", "choices": [choice], "usage": {"completion_tokens": 7}}


class Stub:
    """Starts a threaded server; `behavior(n, path, body) -> (status, payload, delay_s[, headers])`; a str payload
    is sent as it is (malformed answers)."""

    def __init__(self, behavior):
        self.behavior = behavior
        self.requests: list[tuple[str, dict]] = []
        self.headers: list[dict] = []
        self.times: list[float] = []
        self.client_ports: set[int] = set()
        self.inflight = 0
        self.max_inflight = 0
        self.lock = threading.Lock()
        stub = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with stub.lock:
                    n = len(stub.requests)
                    stub.requests.append((self.path, body))
                    stub.headers.append({k.lower(): v for k, v in self.headers.items()})
                    stub.times.append(time.monotonic())
                    stub.client_ports.add(self.client_address[1])
                    stub.inflight += 1
                    stub.max_inflight = max(stub.max_inflight, stub.inflight)
                try:
                    status, payload, delay, *extra = stub.behavior(n, self.path, body)
                    headers = extra[0] if extra else {}
                    if delay:
                        time.sleep(delay)
                    data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                    try:
                        self.send_response(status)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(data)))
                        for name, value in headers.items():
                            self.send_header(name, value)
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
    kw.setdefault("timeout_s", 5.0)
    kw.setdefault("api_key", "sk-test-secret-0123456789")
    return OpenAICompatibleAnchorGenerator(stub.base_url, "stub-model", **kw)


def ok(text: str = "- heist thriller"):
    return lambda n, p, b: (200, chat_payload(text), 0)


def test_chat_success_with_logprobs_key_extra_body_and_request_shape(monkeypatch, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("MY_LLM_KEY", "sk-from-env-abcdef")
    text = "- space opera adventure\n- dark crime drama\n- Fargo (1996)"
    with Stub(ok(text)) as stub:
        gen = OpenAICompatibleAnchorGenerator(
            stub.base_url, "stub-model", api_key_env="MY_LLM_KEY", max_concurrency=2, extra_body={"top_k": 20}
        )
        res = gen.generate([hist("a"), hist("b")], k=3, progress=False)
    df = res.anchors
    assert df[df.user_id == "a"].anchor_text.tolist() == ["space opera adventure", "dark crime drama"]
    assert df.logprob.round(6).eq(-0.25).all()
    assert df.gen_prob.round(6).eq(round(math.exp(-0.25), 6)).all()
    assert not df.is_fallback.any()
    assert res.stats["llm_anchors"] == 4 and res.stats["parse_copied_title"] == 2
    assert res.stats["generated_tokens"] == 14 and res.stats["http_retries"] == 0
    path, body = stub.requests[0]
    assert path == "/v1/chat/completions"
    assert body["model"] == "stub-model" and body["logprobs"] is True and body["top_k"] == 20
    assert body["messages"][0]["role"] == "system"
    last = body["messages"][-1]["content"]
    assert "Toy Story: Animation, Children's, Comedy" in last  # compact: no year
    assert last.endswith("Main genres: Animation, Children's, Comedy")  # ties: first seen
    assert {h.get("authorization") for h in stub.headers} == {"Bearer sk-from-env-abcdef"}
    # the key appears in no log record and no rendering of the generator
    assert "sk-from-env-abcdef" not in caplog.text and "sk-from-env-abcdef" not in repr(gen)
    assert "sk-from-env-abcdef" not in gen.cache_signature()


def test_429_retry_after_is_honoured():
    def behavior(n, path, body):
        if n == 0:
            return 429, {"error": {"message": "slow down"}}, 0, {"Retry-After": "2"}
        return 200, chat_payload("- heist thriller"), 0

    with Stub(behavior) as stub:
        res = make(stub, max_retries=2, max_concurrency=1).generate([hist("a")], k=2, progress=False)
    assert res.anchors.anchor_text.tolist() == ["heist thriller"]
    assert res.stats["http_retries"] == 1 and res.stats["http_status_429"] == 1
    # the SDK's own first backoff is at most 0.5 s: a gap of 2 s is the server's Retry-After
    assert stub.times[1] - stub.times[0] >= 1.9


def test_retries_5xx_then_success():
    def behavior(n, path, body):
        if n < 2:
            return 503, {"error": "overloaded"}, 0, {"Retry-After": "0"}
        return 200, chat_payload("- heist thriller"), 0

    with Stub(behavior) as stub:
        res = make(stub, max_retries=3, max_concurrency=1).generate([hist("a")], k=2, progress=False)
    assert res.anchors.anchor_text.tolist() == ["heist thriller"]
    assert res.stats["http_retries"] == 2 and res.stats["http_status_503"] == 2
    assert len(stub.requests) == 3


def test_5xx_after_retries_is_a_counted_fallback():
    def behavior(n, path, body):  # user b's requests always fail, the others succeed
        if "Fargo" not in body["messages"][-1]["content"]:
            return 500, {"error": "boom"}, 0, {"Retry-After": "0"}
        return 200, chat_payload("- cozy mystery"), 0

    failing_user = UserHistory("b", ("9",), ("Heat (1995). Genres: Action, Crime, Thriller",))
    with Stub(behavior) as stub:
        gen = make(stub, max_retries=1, max_concurrency=1)
        res = gen.generate([hist("a"), failing_user, hist("c")], k=2, progress=False)
    df = res.anchors
    assert not df[df.user_id != "b"].is_fallback.any()
    assert df[df.user_id == "b"].is_fallback.all()
    assert df[df.user_id == "b"].fallback_reason.eq("generation_error").all()
    assert res.stats["openai_failed_server_error"] == 1 and res.stats["fallback_generation_error"] == 1
    assert res.stats["http_status_500"] == 2 and res.stats["http_retries"] == 1


def test_timeout_is_a_counted_fallback():
    with Stub(lambda n, p, b: (200, chat_payload("- late"), 1.5)) as stub:
        gen = make(stub, timeout_s=0.2, max_retries=1, max_failure_share=1.0)
        res = gen.generate([hist("a")], k=2, progress=False)
        assert len(stub.requests) == 2  # one retry
    assert res.anchors.is_fallback.all()
    assert res.stats["openai_failed_timeout"] == 1 and res.stats["generation_errors"] == 1


def test_on_error_raise_names_url_and_cause():
    with Stub(lambda n, p, b: (200, chat_payload("- late"), 1.0)) as stub:
        gen = make(stub, timeout_s=0.2, max_retries=0, on_error="raise")
        with pytest.raises(AnchorBackendError, match=r"/v1/chat/completions: no anchors for user a \(timeout"):
            gen.generate([hist("a")], k=2, progress=False)


@pytest.mark.parametrize(
    "payload",
    [
        "<html>bad gateway</html>",
        {"id": "x", "object": "chat.completion"},
        {"choices": [{"index": 0, "message": {"role": "assistant"}}]},
    ],
)
def test_malformed_answers_are_counted_fallbacks(payload):
    with Stub(lambda n, p, b: (200, payload, 0)) as stub:
        res = make(stub, max_failure_share=1.0).generate([hist("a"), hist("b")], k=2, progress=False)
    assert res.anchors.is_fallback.all()
    assert res.stats["openai_failed_malformed_response"] == 2


def test_most_users_failing_raises():
    with Stub(lambda n, p, b: (200, "not json", 0)) as stub:
        with pytest.raises(AnchorBackendError, match="3 of 3 users got no answer"):
            make(stub).generate([hist(f"u{i}") for i in range(3)], k=2, progress=False)


def test_bad_key_fails_fast_without_showing_it():
    with Stub(lambda n, p, b: (401, {"error": {"message": "invalid api key"}}, 0)) as stub:
        with pytest.raises(AnchorBackendError, match="check the base URL, model name and API key") as info:
            make(stub, max_retries=5).generate([hist("a")], k=2, progress=False)
        assert len(stub.requests) == 1
    assert "sk-test-secret" not in str(info.value)


def test_connection_refused_is_a_counted_failure():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    gen = OpenAICompatibleAnchorGenerator(f"http://127.0.0.1:{port}/v1", "m", max_retries=1)
    with pytest.raises(AnchorBackendError, match="1 of 1 users got no answer.*connection_error"):
        gen.generate([hist("a")], k=2, progress=False)


def test_logprobs_rejected_then_retried_without():
    def behavior(n, path, body):
        if body.get("logprobs"):
            return 400, {"error": {"message": "logprobs is not supported"}}, 0
        return 200, chat_payload("- cozy mystery", token_logprob=None), 0

    with Stub(behavior) as stub:
        res = make(stub).generate([hist("a"), hist("b")], k=2, progress=False)
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
        return (
            200,
            {
                "id": "c",
                "object": "text_completion",
                "created": 0,
                "model": "m",
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "text": text,
                        "logprobs": {
                            "tokens": toks,
                            "token_logprobs": [-0.1, -0.3, -1.0, -1.0, -0.5, -0.7],
                            "text_offset": offs,
                        },
                    }
                ],
            },
            0,
        )

    with Stub(behavior) as stub:
        res = make(stub, endpoint="completions").generate([hist("a")], k=3, progress=False)
        path, body = stub.requests[0]
    assert path == "/v1/completions" and body["logprobs"] == 1 and body["prompt"].endswith("Assistant: -")
    df = res.anchors
    assert df.anchor_text.tolist() == ["space opera", "noir detective"]
    assert df.logprob.round(6).tolist() == [-0.2, -0.6]


def test_bounded_concurrency_reused_connections_and_order():
    hs = [hist(f"u{i}") for i in range(12)]
    with Stub(lambda n, p, b: (200, chat_payload(f"- anchor {n}"), 0.1)) as stub:
        gen = make(stub, max_concurrency=3)
        res = gen.generate(hs, k=2, progress=False)
        gen.close()
    assert 2 <= stub.max_inflight <= 3
    assert len(stub.client_ports) <= 3  # 12 requests over at most 3 kept-alive connections
    assert res.anchors.user_id.tolist() == [h.user_id for h in hs]


def test_garbage_server_output_falls_back_to_history():
    outs = ["", "Sure! Here you go:", "\x00\x01???", "- Star Wars (1977)"]
    with Stub(lambda n, p, b: (200, chat_payload(outs[n % 4]), 0)) as stub:
        res = make(stub, max_concurrency=1).generate([hist(f"u{i}") for i in range(4)], k=2, progress=False)
    df = res.anchors
    assert df.groupby("user_id").size().min() >= 1
    assert df.is_fallback.all()
    assert res.stats["fallback_no_usable_output"] == 4


def test_huge_item_text_is_capped_in_the_request():
    huge = UserHistory("big", ("1", "2"), ("A" * 1_000_000 + ". Genres: Drama", TEXTS[1]))
    with Stub(ok()) as stub:
        res = make(stub, max_concurrency=1).generate([huge], k=2, progress=False)
        body = stub.requests[0][1]
    content = body["messages"][-1]["content"]
    assert len(content) < 2000 and "Star Wars" in content
    assert res.stats["prompt_item_truncated"] == 1 and res.stats["prompt_capped_users"] == 1


def test_signature_changes_with_params_not_with_url_or_key():
    a = OpenAICompatibleAnchorGenerator("http://127.0.0.1:1/v1", "m")
    b = OpenAICompatibleAnchorGenerator("http://127.0.0.1:1/v1", "m", temperature=0.7)
    c = OpenAICompatibleAnchorGenerator("http://127.0.0.1:2/v1", "m", api_key="sk-other")
    d = OpenAICompatibleAnchorGenerator("http://127.0.0.1:1/v1", "m", extra_body={"top_k": 5})
    assert a.cache_signature() != b.cache_signature()
    assert a.cache_signature() == c.cache_signature()  # neither URL nor key changes the output
    assert a.cache_signature() != d.cache_signature()


def test_settings_build_the_backend_with_the_key_masked(monkeypatch):
    from gpl_platform.config import load_settings
    from gpl_platform.pseudo_labels.model_loading import anchor_generator

    monkeypatch.setenv("GPL_ANCHORS__BACKEND", "openai")
    monkeypatch.setenv("GPL_ANCHORS__OPENAI_API_KEY", "sk-settings-secret-42")
    monkeypatch.setenv("GPL_ANCHORS__OPENAI_EXTRA_BODY", '{"top_k": 20}')
    monkeypatch.setenv("GPL_ANCHORS__OPENAI_MAX_RETRIES", "1")
    settings = load_settings()
    assert "sk-settings-secret-42" not in settings.model_dump_json()  # `gpl config` shows it masked
    with Stub(ok()) as stub:
        monkeypatch.setenv("GPL_ANCHORS__OPENAI_BASE_URL", stub.base_url)
        gen = anchor_generator(load_settings())
        res = gen.generate([hist("a")], k=2, progress=False)
        gen.close()
    assert not res.anchors.is_fallback.any()
    assert stub.headers[0]["authorization"] == "Bearer sk-settings-secret-42" and stub.requests[0][1]["top_k"] == 20
    assert gen.max_retries == 1 and "sk-settings-secret-42" not in repr(gen)
