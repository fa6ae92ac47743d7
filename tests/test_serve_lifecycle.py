"""Server settings and lifetime, each on a server of its own: `--config` file with flags
overriding it, `--served-model-name`, `--api-key`; SIGTERM drains in-flight requests and
exits 0; a drain that times out ends the stream it cuts with an SSE error event."""

from __future__ import annotations

import asyncio
import signal
import threading

import httpx
import openai
import pytest
import yaml

from serve_fixtures import SERVER_LIMITS, LiveServer

KEY = "sk-test-key"
NAME = "house-model"


def _settings_file(tmp_path, **extra) -> str:
    # SERVER_LIMITS spelled as a config file, so this server compiles what the others did.
    flags = dict(zip(SERVER_LIMITS[::2], SERVER_LIMITS[1::2]))
    data = {name.lstrip("-"): int(value) for name, value in flags.items()}
    data.update(extra)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def configured(tmp_path_factory):
    """From a file: the engine limits, a served name, an API key, and a max-waiting the
    command line overrides."""
    config = _settings_file(tmp_path_factory.mktemp("cfg"), served_model_name=[NAME], api_key=KEY, max_waiting=1)
    server = LiveServer(["--config", config, "--max-waiting", "32", "--shutdown-timeout", "60"]).wait_ready()
    yield server
    server.stop()


def test_config_file_and_served_model_name(configured):
    client = configured.client(api_key=KEY)
    assert [m.id for m in client.models.list().data] == [NAME]
    r = client.completions.create(model=NAME, prompt="hi", max_tokens=2, extra_body={"ignore_eos": True})
    assert r.model == NAME and r.usage.completion_tokens == 2
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny", prompt="hi", max_tokens=2)


def test_config_values_are_overridden_by_flags(configured):
    # max_waiting=1 in the file would refuse a third simultaneous request; the flag's 32 does not.
    async def run():
        client = configured.async_client(api_key=KEY)
        return await asyncio.gather(*(client.completions.create(model=NAME, prompt="x", max_tokens=4, extra_body={"ignore_eos": True}) for _ in range(12)))

    assert all(r.usage.completion_tokens == 4 for r in asyncio.run(run()))


def test_api_key_guards_v1_routes(configured):
    with pytest.raises(openai.AuthenticationError):
        configured.client(api_key="wrong").models.list()
    r = configured.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    # Probes and tooling stay open, as in vLLM.
    assert configured.get("/health").status_code == 200
    assert configured.get("/metrics").status_code == 200
    assert configured.post("/tokenize", json={"prompt": "hi"}).status_code == 200


def _stream_in_thread(server: LiveServer, max_tokens: int, results: list, first_token: threading.Event):
    def run():
        try:
            stream = server.client(api_key=KEY).completions.create(
                model=NAME,
                prompt="drain me", max_tokens=max_tokens, stream=True, extra_body={"ignore_eos": True, "return_token_ids": True}
            )
            tokens, finish = [], None
            for chunk in stream:
                tokens += chunk.choices[0].token_ids or []
                finish = chunk.choices[0].finish_reason or finish
                first_token.set()
            results.append((len(tokens), finish))
        except Exception as e:  # reported to the test thread
            results.append(e)
            first_token.set()

    t = threading.Thread(target=run)
    t.start()
    return t


def test_sigterm_drains_in_flight_requests_then_exits_0(configured):
    results: list = []
    started = [threading.Event() for _ in range(3)]
    threads = [_stream_in_thread(configured, 120, results, ev) for ev in started]
    for ev in started:
        assert ev.wait(60)
    configured.proc.send_signal(signal.SIGTERM)
    # New requests are refused while the old ones finish.
    try:
        r = configured.post("/v1/completions", json={"prompt": "late", "max_tokens": 2}, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 503
    except httpx.TransportError:
        pass  # or the listener is already closed
    for t in threads:
        t.join(120)
    assert results == [(120, "length")] * 3
    assert configured.proc.wait(60) == 0
    assert "Application shutdown complete" in configured.log_tail()


def test_drain_timeout_ends_cut_streams_with_an_error_event():
    server = LiveServer([*SERVER_LIMITS, "--shutdown-timeout", "0"]).wait_ready()
    try:
        with httpx.stream(
            "POST", f"{server.base_url}/v1/completions", json={"prompt": "cut", "max_tokens": 200, "ignore_eos": True, "stream": True}, timeout=60
        ) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            server.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert '"error"' in rest[-2] and "shutting down" in rest[-2]
        assert server.proc.wait(60) == 0
    finally:
        server.stop()
