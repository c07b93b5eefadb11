"""`tuneloop serve`: the champion as an OpenAI-compatible, retrieval-augmented assistant.

`create_app(project, *, model_factory=None)` builds the FastAPI app (see `tuneloop.serve.app`).
"""
from tuneloop.serve.app import create_app

__all__ = ["create_app"]
