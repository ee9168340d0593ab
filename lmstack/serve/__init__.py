"""An OpenAI-compatible HTTP server over the engine: chat and text completions (streamed or not),
embeddings, models, health and Prometheus metrics, behind API keys, rate limits and deadlines."""

from lmstack.serve.app import ModelEntry, ServerSettings, create_app
from lmstack.serve.server import BackgroundServer, run_server, usage_banner

__all__ = ["BackgroundServer", "ModelEntry", "ServerSettings", "create_app", "run_server", "usage_banner"]
