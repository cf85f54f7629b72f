"""What both HTTP front-ends (the OpenAI server and the P/D proxy) need, below both: OpenAI
errors (`errors.py`) and request models (`protocol.py`), FastAPI set-up (`setup.py`), body limits
(`limits.py`), client disconnects (`disconnect.py`) and the proxy <-> instance wire
(`instance_wire.py`: requests and responses; `discovery_wire.py`: registration and heartbeats).
Nothing here loads torch."""
