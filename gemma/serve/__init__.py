"""Serving: continuous batching on the compact KV cache (`Engine`), the OpenAI-compatible HTTP server
(`python -m gemma serve`, in gemma.serve.server: the only module that imports FastAPI) and RL actors."""

from gemma.serve.engine import Choice, Engine, EngineClosed, Event, Generation, Request, StaleWeights

__all__ = ["Choice", "Engine", "EngineClosed", "Event", "Generation", "Request", "StaleWeights"]
