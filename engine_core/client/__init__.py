"""Engine-core processes and every client that reaches them: the declared boundary
(`base.py`), the engine process itself (`core_process.py`), the one launcher (`launcher.py`:
sockets, spawn or Ray actors (`ray_launcher.py`), handshake, reaping), the one asyncio client of
one or N engines (`core_client.py`, with prefix routing in `prefix_router.py`), its
synchronous facade (`sync.py`), `make_client` (`factory.py`), and the headless launcher of
remote engines (`headless.py`)."""
