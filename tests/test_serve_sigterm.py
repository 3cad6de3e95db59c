"""``mspeckv serve`` as a process: flags refused before the weights load, and SIGTERM during load: no traceback,
every client gets a full response or an error, the process ends."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from mspeckv import cli  # noqa: E402
from tests.tiny import save_tiny_pair  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("tiny"))[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("flags,msg", [
    (["--max-batch", "0"], "--max-batch"),
    (["--queue", "0"], "--queue"),
    (["--port", "70000"], "--port"),
    (["--timeout", "-1"], "--timeout"),
    (["--max-context", "100000"], "--max-context 100000 is beyond"),
    (["--press-every", "4", "--press", "streaming"], "--press-every"),
    (["--api-key", " "], "--api-key"),
    (["--kv-quant", "int8"], "--kv-quant"),  # a placement flag where nothing is offloaded
    (["--gamma", "3"], "--gamma would be ignored: they go with --mode self, vanilla or mspeckv"),
    (["--mode", "vanilla"], "--mode vanilla needs --draft"),
    (["--mode", "self", "--draft", "x"], "--draft goes with --mode vanilla or mspeckv only"),
    (["--mode", "mspeckv"], "--mode mspeckv needs --draft"),
    (["--mode", "self", "--draft-gamma", "2"], "--draft-gamma would be ignored"),
    (["--mode", "vanilla", "--draft", "d", "--self-window", "9"], "--self-window would be ignored"),
    (["--mode", "vanilla", "--draft", "d", "--self-sinks", "2"], "--self-sinks would be ignored"),
    (["--mode", "self", "--draft-window", "64"], "--draft-window would be ignored: --mode self"),
    (["--draft-window", "64"], "--draft-window would be ignored: they go with"),
    (["--mode", "vanilla", "--draft", "d", "--draft-window", "0"], "--draft-window must be an integer >= 1"),
    (["--mode", "self", "--gamma", "0"], "gamma"),
    (["--mode", "self", "--press", "streaming"], "runs over the dense batched KV"),
    (["--on-chip", "1", "--kv-quant", "int2", "--kv-group-size", "16"], "Pass --allow-lossy to run it anyway"),
])
def test_bad_flags_one_error_before_weights(model_dir, monkeypatch, capsys, flags, msg):
    target = model_dir
    capsys.readouterr()

    def no_load(*a, **k):
        raise AssertionError("weights loaded")

    monkeypatch.setattr("mspeckv.model.api.load", no_load)
    assert cli.main(["serve", "--model", target, "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mspeckv: error:") and msg in err and err.count("\n") == 1


def test_sigterm_during_load(model_dir):
    target = model_dir
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "mspeckv", "serve", "--model", target, "--device", "cpu",
                             "--port", str(port), "--max-batch", "4", "--max-context", "300", "--shutdown-timeout",
                             "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        t = time.time()
        while time.time() - t < 60:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            pytest.fail("the server did not come up: " + proc.stderr.read() if proc.poll() is not None else "")
        results, started = {}, threading.Semaphore(0)

        def client(i):
            """'full' (a [DONE] after a finish_reason), 'error' (refused, an error status or an error event), or
            anything else (a stream cut short without an error: a failure)."""
            body = {"model": target, "prompt": "hello world " * (i % 5 + 1), "max_tokens": 150 + 10 * i,
                    "temperature": 0, "stream": True}
            try:
                with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
                    if r.status_code != 200:
                        results[i] = "error"
                        return
                    finish, lines = None, []
                    for line in r.iter_lines():
                        if not line:
                            continue
                        lines.append(line)
                        if len(lines) == 1:
                            started.release()
                        if line == "data: [DONE]":
                            results[i] = "full" if finish else "cut"
                            return
                        d = json.loads(line.removeprefix("data: "))
                        if "error" in d:
                            results[i] = "error"
                            return
                        finish = d["choices"][0]["finish_reason"] or finish
                    results[i] = "cut"
            except httpx.TransportError:
                results[i] = "error"

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(10)]
        for th in threads:
            th.start()
        assert started.acquire(timeout=30)
        proc.send_signal(signal.SIGTERM)
        late = threading.Thread(target=client, args=(10,), daemon=True)  # after the signal: refused
        late.start()
        for th in [*threads, late]:
            th.join(40)
        out, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "Traceback" not in err, err
    assert proc.returncode == 0, err
    assert sorted(results) == list(range(11))
    assert set(results.values()) <= {"full", "error"}, results
    assert "full" in results.values() and "error" in results.values(), results
