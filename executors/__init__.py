"""Where pipeline stages run: in this process (`inprocess.py`) or as Ray actors
(`ray_executor.py`), each implementing `engine_core.executor.Executor`; `factory.make_executor`
picks one for a config."""
