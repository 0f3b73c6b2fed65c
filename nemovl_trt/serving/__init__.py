"""Serving robustness around the OpenAI frontend: input guards, the ASGI edge (auth, deadlines, request ids,
supervision status), supervision of tritonserver, process lifecycle, and the API's OpenAPI document.

Stages: this package sits between `triton` (it drives `triton/launcher.py`) and `server` (which may import
from it); it imports nothing from `server`.
"""
