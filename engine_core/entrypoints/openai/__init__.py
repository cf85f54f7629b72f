"""The OpenAI-compatible HTTP server (`pp-engine serve`).

    from engine_core.entrypoints.openai import build_app
    app = build_app(await AsyncLLM.create(EngineArgs(model=...)), "my-model")
"""

from engine_core.entrypoints.openai.api_server import build_app, run_server

__all__ = ["build_app", "run_server"]
