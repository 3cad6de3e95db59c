"""``mspeckv serve``: an OpenAI-compatible server over the batched engine (``scheduler.py``: continuous batching
in one background thread; ``app.py``: the FastAPI app). Imports nothing from the CLI."""
