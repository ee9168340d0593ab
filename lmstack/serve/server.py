"""Run the app under uvicorn, in the foreground (`run_server`, what `lmstack serve` calls) or on a thread
of its own (`BackgroundServer`: tests, notebooks).

Graceful shutdown (SIGTERM, or Ctrl-C once): uvicorn stops accepting connections and waits up to
`drain_timeout_s` for open requests, streams included, to finish; then the app's lifespan drains each
engine and aborts what is still left. A second Ctrl-C forces the exit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import uvicorn

from lmstack.serve.app import ModelEntry, ServerSettings, create_app


class _Server(uvicorn.Server):
    """uvicorn's server, announcing itself once it really listens."""

    def __init__(self, config: uvicorn.Config, banner: str | None = None) -> None:
        super().__init__(config)
        self.banner = banner

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started and self.banner:
            print(self.banner, flush=True)


def _config(app: Any, host: str, port: int, log_level: str, drain_timeout_s: float) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=int(max(drain_timeout_s, 1)),
        lifespan="on",
    )


def run_server(
    models: Mapping[str, ModelEntry],
    settings: ServerSettings | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    banner: str | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM, then drain. `banner` is printed once the socket is listening."""
    settings = settings or ServerSettings()
    app = create_app(models, settings)
    _Server(_config(app, host, port, log_level, settings.drain_timeout_s), banner).run()


def usage_banner(host: str, port: int, model: str, needs_key: bool) -> str:
    """How to call the server: curl and the openai client, for the first model."""
    shown = "localhost" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown}:{port}/v1"
    key = "$LMSTACK_API_KEY" if needs_key else "none"
    auth = f' -H "Authorization: Bearer {key}"' if needs_key else ""
    return (
        f"lmstack serve: {base} (model {model!r}); Ctrl-C drains and stops\n\n"
        f"  curl {base}/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
        f'    -d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}\'\n\n'
        "  from openai import OpenAI\n"
        f'  client = OpenAI(base_url="{base}", api_key="{"YOUR_KEY" if needs_key else "none"}")\n'
        f'  print(client.chat.completions.create(model="{model}", '
        'messages=[{"role": "user", "content": "Hello!"}]).choices[0].message.content)\n'
    )


class BackgroundServer:
    """A real uvicorn server on a daemon thread. `start()` returns once it listens (port 0 picks a free
    one); `stop()` shuts it down gracefully, draining open requests, and waits for the thread."""

    def __init__(
        self, app: Any, host: str = "127.0.0.1", port: int = 0, drain_timeout_s: float = 30.0
    ) -> None:
        self._server = _Server(_config(app, host, port, "warning", drain_timeout_s))
        self._thread = threading.Thread(target=self._server.run, name="lmstack-uvicorn", daemon=True)
        self.host, self.port = host, port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        t0 = time.monotonic()
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError("the server did not start (port in use? see the log above)")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
