"""pyguard serve (issue #15) on SmolLM2: the official openai client against a live server,
streaming and not; every bad input gets its OpenAI-style error and the next request succeeds;
a full queue gets 429; a disconnect frees the slot; shutdown finishes what it accepted."""
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("llama_cpp")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from pyguard import models  # noqa: E402
from pyguard.llama import GuardedLlama  # noqa: E402
from pyguard.methods import CoCA  # noqa: E402

MODEL = models.model_path("smollm2-135m")
pytestmark = pytest.mark.needs_file(MODEL, "SmolLM2")
MSGS = [{"role": "user", "content": "Name three colors."}]


class Live:
    """A uvicorn server on a free port, in a thread."""

    def __init__(self, g, **kw):
        from pyguard import server

        self.g = g
        cfg = uvicorn.Config(server.create_app(g, "smol", **kw), host="127.0.0.1", port=0, log_level="error",
                             timeout_graceful_shutdown=30)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def client(self, key="none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def post(self, body: bytes, path="/v1/chat/completions", headers=None):
        """(status, parsed JSON, headers) of a raw POST."""
        req = urllib.request.Request(self.url + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req) as r:
                return r.status, json.loads(r.read()), r.headers
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), e.headers

    def get(self, path):
        with urllib.request.urlopen(self.url + path) as r:
            return r.read().decode()

    def stop(self):
        self.server.should_exit = True
        self.thread.join()


@pytest.fixture(scope="module")
def live():
    g = GuardedLlama(MODEL, n_ctx=256, parallel=4, coca=CoCA(alpha=1.5))
    s = Live(g)
    yield s
    s.stop()


def test_openai_client_plain_and_streaming(live):
    c = live.client()
    assert [m.id for m in c.models.list().data] == ["smol"]
    r = c.chat.completions.create(model="smol", messages=MSGS, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.content
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5
    assert r.model_extra["pyguard"]["coca"]["dual_steps"] == r.usage.completion_tokens
    chunks = list(c.chat.completions.create(model="smol", messages=MSGS, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content  # greedy: the stream says the same
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["pyguard"]["coca"]["alpha"] == 1.5
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # the same prompt again: its KV comes from the prompt cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1
    health = json.loads(live.get("/health"))
    assert health["status"] == "ok"
    metrics = live.get("/metrics")
    assert "pyguard_requests_total{status=\"200\"}" in metrics and "pyguard_prompt_cached_tokens_total" in metrics
    assert "pyguard_time_to_first_token_seconds" in metrics


def test_guard_choices_in_the_request_body(live):
    c = live.client()
    r = c.chat.completions.create(model="smol", messages=MSGS, max_tokens=4, extra_body={"pyguard": {"coca": False}})
    assert r.model_extra["pyguard"]["coca"] is None
    r = c.chat.completions.create(model="smol", messages=MSGS, max_tokens=4, extra_body={"pyguard": {"alpha": 2.5}})
    assert r.model_extra["pyguard"]["coca"]["alpha"] == 2.5
    with pytest.raises(openai.BadRequestError, match="loaded without CASA"):
        c.chat.completions.create(model="smol", messages=MSGS, max_tokens=4, extra_body={"pyguard": {"casa": True}})


def test_ignore_eos_runs_to_max_tokens(live):
    """As vLLM and llama-server: load generators (guidellm) send ignore_eos for fixed lengths."""
    short = [{"role": "user", "content": "Say hi."}]
    c = live.client()
    r = c.chat.completions.create(model="smol", messages=short, max_tokens=60, temperature=0)
    assert r.usage.completion_tokens < 60 and r.choices[0].finish_reason == "stop"
    r = c.chat.completions.create(model="smol", messages=short, max_tokens=60, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 60 and r.choices[0].finish_reason == "length"


def test_concurrent_clients_get_their_lone_answers(live):
    c = live.client()
    prompts = [[{"role": "user", "content": f"Say something about {t}."}] for t in ("cats", "rain", "chess", "gold",
                                                                                        "snow", "bread")]
    one = lambda m: c.chat.completions.create(model="smol", messages=m, max_tokens=10, temperature=0)  # noqa: E731
    alone = [one(m).choices[0].message.content for m in prompts]
    out = [None] * len(prompts)
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, one(prompts[i]).choices[0].message.content))
               for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == alone


@pytest.mark.parametrize("body,status,words", [
    (b"{not json", 400, "not valid JSON"),
    (json.dumps({"messages": MSGS, "colour": 1}).encode(), 400, "unknown or unsupported field 'colour'"),
    (json.dumps({"messages": MSGS, "max_tokens": "ten"}).encode(), 400, "max_tokens"),
    (json.dumps({"messages": MSGS, "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"messages": MSGS, "n": 2}).encode(), 400, "n"),
    (json.dumps({"messages": "hi"}).encode(), 400, "messages"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), 400, "unknown role 'robot'"),
    (json.dumps({"messages": MSGS, "max_tokens": 5000}).encode(), 400, "exceeds the context of 256 tokens"),
    (json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]}).encode(), 400,
     "loaded without an mmproj file"),
])
def test_bad_input_is_an_openai_error_and_the_server_goes_on(live, body, status, words):
    code, err, _ = live.post(body)
    assert code == status and err["error"]["type"] == "invalid_request_error"
    assert words in err["error"]["message"]
    code, ok, _ = live.post(json.dumps({"messages": MSGS, "max_tokens": 2}).encode())
    assert code == 200 and ok["usage"]["completion_tokens"] <= 2


def test_disconnect_mid_stream_frees_the_slot(live):
    req = urllib.request.Request(live.url + "/v1/chat/completions", method="POST",
                                 data=json.dumps({"messages": MSGS, "max_tokens": 150, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    r = urllib.request.urlopen(req)
    assert r.readline().startswith(b"data: ")
    r.close()  # the client goes away
    deadline = time.time() + 30
    while live.g.scheduler.depth() != (0, 0) and time.time() < deadline:
        time.sleep(0.05)
    assert live.g.scheduler.depth() == (0, 0)
    assert live.client().chat.completions.create(model="smol", messages=MSGS, max_tokens=2).usage.completion_tokens


def test_full_queue_gets_429_and_shutdown_finishes_accepted_requests():
    s = Live(GuardedLlama(MODEL, n_ctx=256, parallel=1, max_queue=1), api_key="k")
    try:
        code, err, _ = s.post(json.dumps({"messages": MSGS}).encode())
        assert code == 401 and err["error"]["type"] == "authentication_error"
        results = []
        body = json.dumps({"messages": MSGS, "max_tokens": 40}).encode()
        auth = {"Authorization": "Bearer k"}
        threads = [threading.Thread(target=lambda: results.append(s.post(body, headers=auth))) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(code for code, _, _ in results)
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
        busy = next(r for r in results if r[0] == 429)
        assert busy[2]["Retry-After"] == "1" and busy[1]["error"]["type"] == "rate_limit_error"
        # shutdown while a request runs: it is answered, not dropped
        late = []
        t = threading.Thread(target=lambda: late.append(s.post(body, headers=auth)))
        t.start()
        while s.g.scheduler.depth() == (0, 0) and t.is_alive():
            time.sleep(0.01)
    finally:
        s.stop()
    t.join()
    assert late and late[0][0] == 200 and late[0][1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_sigterm_finishes_the_request_in_flight_and_exits_0(tmp_path):
    """The real CLI process: SIGTERM while a request runs; it is answered, the exit code is 0."""
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pyguard.cli", "serve", "--model", str(MODEL), "--method", "none",
                             "--parallel", "1", "--n-ctx", "256", "--port", str(port)], stdout=log, stderr=log)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                time.sleep(0.2)
        out = []
        body = json.dumps({"messages": MSGS, "max_tokens": 40, "ignore_eos": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        t = threading.Thread(target=lambda: out.append(json.loads(urllib.request.urlopen(req).read())))
        t.start()
        while not out and b"pyguard_active_requests 1.0" not in urllib.request.urlopen(
                f"http://127.0.0.1:{port}/metrics").read():
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert out and out[0]["usage"]["completion_tokens"] == 40
