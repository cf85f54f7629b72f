"""The engine's figures under their Prometheus names (`ppengine:...`), shared by the server's
`/metrics`, the proxy's and the offline `LLM.get_metrics()`."""

from __future__ import annotations

PREFIX = "ppengine:"
