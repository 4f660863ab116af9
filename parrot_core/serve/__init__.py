"""`parrot serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn, the `[serve]` extra) with
continuous batching and a chat page. Imports neither torch nor mlx: the model is reached through the
backend contract (parrot.contract)."""
