"""`pp-engine proxy`: the OpenAI front door of disaggregated prefill/decode. `server.py` (the app
and routing of each request to a prefill and a decode instance), `discovery.py` (the registry of
instances), `instance_pool.py` (its sockets to them), `metrics.py`, `config.py`. It never loads
torch (an import-linter contract keeps it so)."""
