"""Front-end clients of engine cores: the declared boundary (`base.py`) and its data-parallel
implementation (`dp.py`: N engine cores behind one front-end), its synchronous facade
(`sync.py`) and the headless launcher of remote engines (`headless.py`). The single-process
clients live in `engine_core/core_client.py`."""
