"""Serving under load: lmstack's server vs llama-cpp-python's server vs a naive transformers server.

Each engine runs as its own OpenAI-compatible server process on a free port, one engine at a time, on the
same GGUF file and thread count. For each concurrency level, that many clients send streaming chat
requests (the official `openai` client) from a fixed, deterministic mix of short chat questions and
code / RAG prompts of about --prompt-tokens tokens. Greedy decoding, no repetition penalty, the model's own
end of turn stops a reply (as a user would run it); output tokens are counted per request.

Per request: TTFT (first content delta), gaps between content chunks (ITL), time per output token
(TPOT), end-to-end latency. Per level: output tokens/s over the level's wall time and percentiles.
Requests still running at --duration-cap are cancelled; the tokens they streamed count, and TTFT
percentiles then hold only requests that got a first token (the table says how many did not).

    .venv/bin/python bench/serve.py --threads 2 --concurrency 1,4,16,64 --max-tokens 128

llama-cpp-python's server runs one request at a time and, by default, cuts a streaming reply off as soon
as another request arrives (`interrupt_requests`); it is started with that turned off so that requests
queue instead. The transformers baseline is what a user would write: `generate` with a
`TextIteratorStreamer`, one request at a time behind a lock (run with --hf-server, internal).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request  # module level: FastAPI resolves the string annotations here

SHORT_QUESTIONS = [
    "What is the difference between a list and a tuple in Python?",
    "Write a bash one-liner that counts the lines of all .py files under the current directory.",
    "Explain what a mutex is in two sentences.",
    "How do I reverse a string in JavaScript?",
    "What does HTTP status code 429 mean and how should a client react to it?",
    "Give me a SQL query that returns the ten most recent orders per customer.",
    "When should I use a generator instead of a list comprehension?",
    "What is the time complexity of inserting into a binary heap?",
]

CODE_REVIEW = '''class TTLCache:
    """A dict-like cache whose entries expire after `ttl` seconds; at most `capacity` entries."""

    def __init__(self, capacity, ttl, clock=time.monotonic):
        self.capacity = capacity
        self.ttl = ttl
        self.clock = clock
        self.items = {}
        self.order = []

    def get(self, key, default=None):
        if key not in self.items:
            return default
        value, stamp = self.items[key]
        if self.clock() - stamp > self.ttl:
            del self.items[key]
            return default
        self.order.remove(key)
        self.order.append(key)
        return value

    def put(self, key, value):
        if len(self.items) >= self.capacity:
            oldest = self.order.pop()
            del self.items[oldest]
        self.items[key] = (value, self.clock())
        if key in self.order:
            self.order.remove(key)
        self.order.append(key)

    def purge(self):
        now = self.clock()
        for key, (value, stamp) in self.items.items():
            if now - stamp > self.ttl:
                del self.items[key]
                self.order.remove(key)

    def __len__(self):
        return len(self.items)


def warm(cache, loader, keys):
    for key in keys:
        if cache.get(key) is None:
            cache.put(key, loader(key))
    return [cache.get(key) for key in keys]
'''

CODE_COMPLETE = """// Parses a URL query string into an object. Repeated keys become arrays,
// keys without a value map to true, and '+' means a space. Used by the dashboard's filter bar
// and by the export endpoint.
export function parseQuery(query) {
  const out = {};
  const text = query.startsWith('?') ? query.slice(1) : query;
  if (!text) return out;
  for (const part of text.split('&')) {
    if (!part) continue;
    const eq = part.indexOf('=');
    const rawKey = eq === -1 ? part : part.slice(0, eq);
    const rawValue = eq === -1 ? null : part.slice(eq + 1);
    const key = decodeURIComponent(rawKey.replace(/\\+/g, ' '));
    const value = rawValue === null ? true : decodeURIComponent(rawValue.replace(/\\+/g, ' '));
    if (Object.prototype.hasOwnProperty.call(out, key)) {
      out[key] = Array.isArray(out[key]) ? [...out[key], value] : [out[key], value];
    } else {
      out[key] = value;
    }
  }
  return out;
}

// Builds a query string from an object; arrays repeat the key, true writes the bare key, and null or
// undefined values are skipped. Keys are sorted so that equal filters give equal URLs (cache hits).
export function buildQuery(params) {
  const parts = [];
  for (const key of Object.keys(params).sort()) {
    const value = params[key];
    if (value === null || value === undefined) continue;
    const values = Array.isArray(value) ? value : [value];
    for (const v of values) {
      if (v === true) {
        parts.push(encodeURIComponent(key));
      } else {
        parts.push(`${encodeURIComponent(key)}=${encodeURIComponent(String(v))}`);
      }
    }
  }
  return parts.length ? `?${parts.join('&')}` : '';
}

// Merges a patch into the current filters and returns the new query string. A key set to null in the
"""

RAG_CONTEXT = """[1] Backups, admin guide section 4.2. The appliance takes a snapshot of every volume
each night at 02:00 local time and keeps the last 14 nightly snapshots. Snapshots are incremental:
only blocks that changed since the previous snapshot are written, so a snapshot of a quiet volume
takes seconds. A snapshot is crash-consistent, not application-consistent; databases should be put in
backup mode by a pre-snapshot hook (Settings > Backups > Hooks) if they need a clean restore point.

[2] Backups, admin guide section 4.3. Off-site copies are optional. When a bucket is configured, each
snapshot is uploaded after it is taken, encrypted with the appliance key. Uploads resume after a network
failure. The first upload of a volume is a full copy and can take hours on a slow link; later uploads send
only changed blocks. Deleting a snapshot locally does not delete its off-site copy: off-site retention is
set separately, in days, and defaults to 30.

[3] Restores, admin guide section 5.1. A volume can be restored from any local snapshot in place (the
volume is offline during the restore) or as a new volume next to the original. Restoring from an off-site
copy first downloads the snapshot chain, then restores as a new volume. Single files can be browsed and
downloaded from a snapshot without restoring the whole volume, for snapshots up to 2 TB.

[4] Release notes 7.3. The nightly schedule can now be changed per volume. Snapshot retention above 14
requires the extended storage licence. Restores of volumes larger than 2 TB are up to three times faster.
Known issue: a pre-snapshot hook that takes longer than 10 minutes is killed and the snapshot is skipped.

[5] Support article 1187. If the nightly snapshot is missing, check the hook log first: a failed or slow
pre-snapshot hook is the usual cause. Next check free space; a pool above 95 percent full pauses snapshots.
"""

LONG_TASKS = [
    ("Review this Python code. Point out the bugs and give a fixed version.\n\n", CODE_REVIEW, ""),
    ("Continue this JavaScript file: write the function the last comment starts.\n\n", CODE_COMPLETE, ""),
    (
        "Answer the question using only the numbered sources, and cite them like [2].\n\nSources:\n",
        RAG_CONTEXT,
        "\n\nQuestion: Last night's snapshot is missing and we need a restore point for our database. "
        "What should we check, and how do we get a clean snapshot?",
    ),
]


def build_prompts(tokenizer: Any, long_tokens: int) -> list[list[dict[str, str]]]:
    """Short questions interleaved with long tasks whose context is its last `long_tokens` tokens (the
    end holds what the task asks about: the comment to continue, the source that answers)."""
    longs = []
    for head, body, tail in LONG_TASKS:
        ids = tokenizer.encode(body, add_special_tokens=False)
        ids = (ids * (long_tokens // max(len(ids), 1) + 1))[-long_tokens:]
        longs.append(head + tokenizer.decode(ids) + tail)
    texts = [t for i, q in enumerate(SHORT_QUESTIONS) for t in (q, longs[i % len(longs)])]
    return [[{"role": "user", "content": t}] for t in texts]


# --- servers -----------------------------------------------------------------------------------------------


@dataclass
class Engine:
    name: str
    argv: list[str]
    extra_body: dict[str, Any] = field(default_factory=dict)


def engine_for(name: str, model: str, gguf: Path, port: int, args: argparse.Namespace) -> Engine | None:
    """The server command line for one engine name, or None when its package is not installed."""
    py, host, t = sys.executable, ["--host", "127.0.0.1", "--port", str(port)], str(args.threads)
    if name == "lmstack" or name.startswith("lmstack-"):
        dtype = ["--dtype", name.split("-", 1)[1]] if "-" in name else []
        argv = [py, "-m", "lmstack.cli", "serve", "-m", model, *host, "--threads", t, "--no-embeddings"]
        return Engine(name, argv + dtype)
    if name == "llama.cpp":
        if not _importable("llama_cpp.server.app"):
            return None
        n_ctx = max(2048, 2 * args.prompt_tokens + args.max_tokens + 256)
        argv = [py, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", model, *host]
        argv += ["--n_threads", t, "--n_threads_batch", t, "--n_ctx", str(n_ctx)]
        argv += ["--interrupt_requests", "False", "--verbose", "False"]
        return Engine(name, argv, {"repeat_penalty": 1.0})
    if name == "transformers":
        if not _importable("transformers"):
            return None
        return Engine(name, [py, __file__, "--hf-server", str(gguf), "--port", str(port), "--threads", t])
    raise AssertionError(name)  # main checked the names


def _importable(module: str) -> bool:
    code = f"import {module}"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, port: int, timeout: float) -> bool:
    """Poll /v1/models until it answers 200; False when the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1.0)
    return False


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- client ------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One request as the client saw it; filled while it streams so a cancelled one keeps what it got."""

    start: float
    chunk_times: list[float] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    usage_tokens: int | None = None
    end: float | None = None
    error: str | None = None


async def one_request(
    client: Any, model: str, messages: list, max_tokens: int, extra: dict, s: Sample
) -> None:
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=messages,
            temperature=0.0,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
        )
        async for chunk in stream:
            if chunk.usage is not None:
                s.usage_tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                s.chunk_times.append(time.perf_counter())
                s.text.append(chunk.choices[0].delta.content)
        s.end = time.perf_counter()
    except Exception as error:  # a failed request is data, not a crash
        s.error = f"{type(error).__name__}: {error}"[:300]


async def run_level(
    port: int, model: str, prompts: list, concurrency: int, n: int, max_tokens: int, extra: dict, cap: float
) -> tuple[list[Sample], float]:
    """`concurrency` closed-loop clients share `n` requests; returns the samples and the wall time."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0, timeout=cap + 60
    )
    todo = list(range(n))
    samples: list[Sample] = []

    async def worker() -> None:
        while todo:
            s = Sample(start=time.perf_counter())
            samples.append(s)
            await one_request(client, model, prompts[todo.pop(0) % len(prompts)], max_tokens, extra, s)

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    _, pending = await asyncio.wait(tasks, timeout=cap)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - t0
    await client.close()
    return samples, wall


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def summarize(samples: list[Sample], wall: float, count_tokens: Any) -> dict[str, Any]:
    done = [s for s in samples if s.end is not None]
    tokens = [
        s.usage_tokens if s.usage_tokens is not None else count_tokens("".join(s.text)) for s in samples
    ]
    ttft = [(s.chunk_times[0] - s.start) * 1e3 for s in samples if s.chunk_times]
    itl = [(b - a) * 1e3 for s in samples for a, b in zip(s.chunk_times, s.chunk_times[1:], strict=False)]
    tpot = [
        (s.chunk_times[-1] - s.chunk_times[0]) * 1e3 / (k - 1)
        for s, k in zip(samples, tokens, strict=True)
        if s.end is not None and k > 1 and s.chunk_times
    ]
    errors = [s.error for s in samples if s.error]
    return {
        "requests": len(samples),
        "completed": len(done),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "no_first_token": sum(1 for s in samples if not s.chunk_times),
        "wall_s": wall,
        "output_tokens": int(sum(tokens)),
        "tok_s": sum(tokens) / wall,
        "out_tokens_per_request": float(np.mean([k for s, k in zip(samples, tokens, strict=True) if s.end]))
        if done
        else None,
        "tokens_per_chunk": sum(tokens) / max(1, sum(len(s.chunk_times) for s in samples)),
        "tokens_counted_by": "usage" if all(s.usage_tokens is not None for s in done) else "tokenizer",
        "ttft_ms": {"p50": _pct(ttft, 50), "p95": _pct(ttft, 95), "p99": _pct(ttft, 99)},
        "itl_ms": {"p50": _pct(itl, 50), "p95": _pct(itl, 95)},
        "tpot_ms_p50": _pct(tpot, 50),
        "e2e_s_p50": _pct([s.end - s.start for s in done if s.end], 50),
    }


def bench_engine(
    engine: Engine, port: int, model: str, prompts: list, args: argparse.Namespace, count: Any
) -> dict:
    """Start the server, warm it up, run every level, stop it; a server that fails to start is 'missing'."""
    log = tempfile.NamedTemporaryFile(prefix=f"serve-{engine.name}-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        engine.argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        t0 = time.monotonic()
        if not wait_ready(proc, port, args.start_timeout):
            tail = Path(log.name).read_text(errors="replace").splitlines()[-8:]
            print(
                f"  {engine.name}: failed to start (log {log.name})\n    " + "\n    ".join(tail), flush=True
            )
            return {"missing": f"failed to start, log {log.name}"}
        print(f"  {engine.name}: ready in {time.monotonic() - t0:.0f}s, warming up", flush=True)
        warm, _ = asyncio.run(
            run_level(port, model, prompts[1:2], 1, 1, args.max_tokens, engine.extra_body, 600)
        )
        if warm[0].error:
            print(f"  {engine.name}: warm-up failed: {warm[0].error}", flush=True)
            return {"missing": f"warm-up failed: {warm[0].error}"}
        levels = {}
        for c in args.concurrency:
            n = args.requests_per_level or max(c, 8)
            samples, wall = asyncio.run(
                run_level(port, model, prompts, c, n, args.max_tokens, engine.extra_body, args.duration_cap)
            )
            levels[str(c)] = summarize(samples, wall, count)
            r = levels[str(c)]
            print(
                f"  {engine.name} c={c}: {r['tok_s']:.1f} tok/s, {r['completed']}/{n} done in {wall:.1f}s"
                + (f", {r['errors']} errors: {r['first_error']}" if r["errors"] else ""),
                flush=True,
            )
        return {"levels": levels}
    finally:
        stop(proc)
        log.close()


# --- report ------------------------------------------------------------------------------------------------

TARGETS = {16: 3.0, 1: 0.7}  # lmstack aggregate tok/s over llama-cpp-python's, from the issue


def _f(x: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def print_report(results: dict[str, dict], levels: list[int]) -> None:
    for c in levels:
        print(f"\n### {c} concurrent clients\n")
        print(
            "| engine | done | tok/s | TTFT p50 ms | p95 | p99 | ITL p50 ms | p95 | TPOT p50 ms | e2e p50 s "
            "| out tok/req | tok/chunk |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, res in results.items():
            r = res.get("levels", {}).get(str(c))
            if r is None:
                print(f"| {name} | missing |" + " |" * 10)
                continue
            t, i = r["ttft_ms"], r["itl_ms"]
            cut = f" ({r['no_first_token']} no token)" if r["no_first_token"] else ""
            print(
                f"| {name} | {r['completed']}/{r['requests']}{cut} | {r['tok_s']:.1f} | {_f(t['p50'])} | "
                f"{_f(t['p95'])} | {_f(t['p99'])} | {_f(i['p50'])} | {_f(i['p95'])} | "
                f"{_f(r['tpot_ms_p50'])} | "
                f"{_f(r['e2e_s_p50'], '{:.2f}')} | {_f(r['out_tokens_per_request'], '{:.1f}')} | "
                f"{r['tokens_per_chunk']:.2f} |"
            )
    ref = results.get("llama.cpp", {}).get("levels")
    mine = [n for n in results if n.startswith("lmstack") and "levels" in results[n]]
    if not ref or not mine:
        print("\nno ratios: llama.cpp or lmstack missing")
        return
    print("\n### lmstack vs llama-cpp-python server\n")
    print("| engine | clients | tok/s ratio | target | TTFT p50 ratio (lower is better) |")
    print("|---|---:|---:|---|---:|")
    for name in mine:
        for c in levels:
            a, b = results[name]["levels"].get(str(c)), ref.get(str(c))
            if not a or not b:
                continue
            ratio = a["tok_s"] / b["tok_s"] if b["tok_s"] else float("inf")
            goal = TARGETS.get(c)
            target = f">= {goal}x: {'PASS' if ratio >= goal else 'FAIL'}" if goal else ""
            ta, tb = a["ttft_ms"]["p50"], b["ttft_ms"]["p50"]
            ttft = f"{ta / tb:.2f}x" if ta and tb else "-"
            print(f"| {name} | {c} | {ratio:.2f}x | {target} | {ttft} |")


# --- the transformers baseline server ---------------------------------------------------------------------


def _sse(delta: dict, usage: dict | None = None, finish: str | None = None) -> str:
    choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
    chunk = {"id": "hf", "object": "chat.completion.chunk", "created": 0, "model": "hf", "choices": choices}
    return f"data: {json.dumps({**chunk, 'usage': usage})}\n\n"


def hf_server(gguf: Path, port: int, threads: int) -> None:
    """Naive OpenAI-style streaming server: transformers `generate` + TextIteratorStreamer, one at a time."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        StoppingCriteria,
        StoppingCriteriaList,
        TextIteratorStreamer,
    )

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    lock = asyncio.Lock()
    app = FastAPI()

    class Stop(StoppingCriteria):  # ends generate when the client goes away, so the lock means one at a time
        def __init__(self) -> None:
            self.event = threading.Event()

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": gguf.stem, "object": "model", "owned_by": "bench"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        text = tok.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
        ids = tok(text, return_tensors="pt").input_ids

        async def events():
            async with lock:
                streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
                stopper, out = Stop(), {}
                kw = dict(input_ids=ids, max_new_tokens=body.get("max_tokens") or 16, do_sample=False,
                          streamer=streamer, stopping_criteria=StoppingCriteriaList([stopper]),
                          pad_token_id=tok.pad_token_id)  # fmt: skip
                worker = threading.Thread(target=lambda: out.update(ids=model.generate(**kw)))
                worker.start()
                try:
                    yield _sse({"role": "assistant", "content": ""})
                    pieces = iter(streamer)
                    while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
                        if piece:
                            yield _sse({"content": piece})
                    worker.join()
                    n = out["ids"].shape[1] - ids.shape[1]
                    yield _sse({}, finish="length" if n >= kw["max_new_tokens"] else "stop")
                    p = ids.shape[1]
                    yield _sse({}, usage={"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n})
                    yield "data: [DONE]\n\n"
                finally:
                    stopper.event.set()
                    worker.join()

        return StreamingResponse(events(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# --- main --------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", default="1,4,16,64", help="comma list of concurrent clients")
    ap.add_argument("--requests-per-level", type=int, default=0, help="default: max(concurrency, 8)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument(
        "--prompt-tokens", type=int, default=300, help="context tokens of the long code/RAG prompts"
    )
    ap.add_argument("--engines", default="lmstack,lmstack-int8,llama.cpp,transformers")
    ap.add_argument("--duration-cap", type=float, default=300, help="seconds per level; then cancel the rest")
    ap.add_argument("--start-timeout", type=float, default=600, help="seconds for a server to come up")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve.json")
    ap.add_argument("--hf-server", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hf_server:
        hf_server(args.hf_server, args.port, args.threads)
        return
    args.concurrency = sorted(int(c) for c in args.concurrency.split(","))
    engines = args.engines.split(",")
    for name in engines:
        if name not in ("lmstack", "llama.cpp", "transformers") and not name.startswith("lmstack-"):
            ap.error(f"unknown engine {name!r}: lmstack, lmstack-<dtype>, llama.cpp, transformers")

    from lmstack.api import default_home
    from lmstack.hub import resolve
    from lmstack.tokenizer import Tokenizer

    load = os.getloadavg()[0]  # other work on the machine skews llama.cpp most: its threads spin-wait
    gguf = resolve(args.model, default_home()).path
    tokenizer = Tokenizer.from_gguf(gguf)
    prompts = build_prompts(tokenizer, args.prompt_tokens)
    prompt_lens = [
        len(tokenizer.encode(tokenizer.apply_chat_template(m), add_special_tokens=False)) for m in prompts
    ]
    print(
        f"model {args.model}  threads {args.threads}  max_tokens {args.max_tokens}  prompts {len(prompts)} "
        f"({min(prompt_lens)}-{max(prompt_lens)} tokens, mean {np.mean(prompt_lens):.0f})  "
        f"load average {load:.1f} on {os.cpu_count()} cpus (want a quiet machine)",
        flush=True,
    )

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    results: dict[str, dict] = {}
    for name in engines:
        port = free_port()
        engine = engine_for(name, args.model, gguf, port, args)
        if engine is None:
            print(f"  {name}: missing (not installed)", flush=True)
            results[name] = {"missing": "not installed"}
            continue
        results[name] = bench_engine(engine, port, args.model, prompts, args, count)
    print_report(results, args.concurrency)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": args.model,
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "prompt_tokens": {
            "min": min(prompt_lens),
            "max": max(prompt_lens),
            "mean": float(np.mean(prompt_lens)),
        },
        "duration_cap_s": args.duration_cap,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_at_start": load,
    }
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
