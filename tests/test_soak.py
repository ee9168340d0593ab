"""64 concurrent clients for 2 minutes against a real `lmstack serve` process, with the official client.

Every request completes or gets an intended refusal (429 from the rate limit, 503 from the bounded queue),
never a 5xx; clients that vanish mid-stream free their KV blocks; the server's resident memory stays flat.
The model is the tiny random checkpoint: this is about the serving machinery, not the model.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import openai
import pytest

CLIENTS = 64
DURATION_S = 120.0
KEY = "sk-soak-0000"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


def _metric(port: int, name: str) -> float:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {KEY}"}
    )
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    values = [float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, flags=re.M)]
    return sum(values)


def _client_loop(port: int, index: int, deadline: float, outcomes: Counter, lock: threading.Lock) -> None:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
    n = 0
    while time.monotonic() < deadline:
        n += 1
        kind = ("stream", "plain", "vanish")[(index + n) % 3]
        messages = [
            {"role": "user", "content": f"client {index} request {n}: " + "tell me a story " * (n % 5)}
        ]
        try:
            if kind == "plain":
                r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16)
                outcome = "ok" if r.choices[0].finish_reason in ("stop", "length") else "bad-finish"
            else:
                stream = client.chat.completions.create(
                    model="tiny", messages=messages, max_tokens=24, stream=True
                )
                for _chunk in stream:
                    if kind == "vanish":  # a client killed mid-stream: close the connection
                        break
                stream.close()
                outcome = "ok" if kind == "stream" else "vanished"
        except openai.APIStatusError as e:
            outcome = str(e.status_code)
            time.sleep(0.05)
        except openai.APIConnectionError:
            outcome = "connection-error"
        with lock:
            outcomes[outcome] += 1


@pytest.mark.slow
def test_64_clients_for_two_minutes(tiny_checkpoint, tmp_path):
    port = _free_port()
    env = dict(os.environ, LMSTACK_HOME=str(tmp_path), LMSTACK_API_KEY=KEY)
    cmd = [sys.executable, "-m", "lmstack.cli", "serve", "-m", f"tiny={tiny_checkpoint}", "--device", "cpu",
           "--port", str(port), "--no-embeddings", "--log-level", "warning", "--max-waiting", "24",
           "--max-num-seqs", "16", "--rate-limit-rpm", "1500", "--threads", "1"]  # fmt: skip
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        try:
            assert proc.stdout is not None
            for line in proc.stdout:  # the banner is printed once the server listens
                if "choices[0].message.content" in line:
                    break
            outcomes: Counter = Counter()
            lock = threading.Lock()
            deadline = time.monotonic() + DURATION_S
            threads = [
                threading.Thread(target=_client_loop, args=(port, i, deadline, outcomes, lock), daemon=True)
                for i in range(CLIENTS)
            ]
            for t in threads:
                t.start()
            time.sleep(20)  # past warm-up: allocator pools, compiled kernels, first batches
            rss_start = _rss_mb(proc.pid)
            for t in threads:
                t.join(timeout=DURATION_S + 90)
            rss_end = _rss_mb(proc.pid)
            assert not any(t.is_alive() for t in threads)

            refused = {"429", "503"}
            assert set(outcomes) <= {"ok", "vanished"} | refused, outcomes  # no 5xx, no dropped connection
            assert outcomes["ok"] > 100 and outcomes["vanished"] > 20, outcomes
            assert sum(outcomes[c] for c in refused) > 0, outcomes  # the limits were really exercised
            assert rss_end <= rss_start * 1.15 + 30, (rss_start, rss_end)  # flat, not growing per request

            for _ in range(100):  # the engine finishes what vanished clients left, then holds nothing
                if _metric(port, "lmstack_num_requests_running") == 0:
                    break
                time.sleep(0.1)
            assert _metric(port, "lmstack_num_requests_running") == 0
            assert _metric(port, "lmstack_num_requests_waiting") == 0
            assert _metric(port, "lmstack_kv_cache_usage_ratio") == 0
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
