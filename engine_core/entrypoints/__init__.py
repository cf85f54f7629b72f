"""The front-ends (the top layer): `LLM` (offline, `llm.py`) and `AsyncLLM` (`async_llm.py`),
both over one input processor and one output processor; the CLI (`cli.py`, `pp-engine`); the
OpenAI server (`openai/`, `pp-engine serve`) and the P/D proxy (`proxy/`, `pp-engine proxy`),
which do not import each other and share `http/` (errors, request models, limits, the
proxy <-> instance wire)."""
