"""Serving gist caches: the engine (continuous batching over cached instructions), the
OpenAI-compatible HTTP layer on LitServe, and the pairwise judge client."""

from .engine import MODES, Event, GenerationRequest, RequestError, ServingEngine, parse_bytes

__all__ = ["MODES", "Event", "GenerationRequest", "RequestError", "ServingEngine", "parse_bytes"]
