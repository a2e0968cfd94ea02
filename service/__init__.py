"""Sluice: a self-hosted, OpenAI-compatible Batch API service on Redis Streams."""
