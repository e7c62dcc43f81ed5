"""Relay: a durable stream relay daemon speaking the Durable Streams protocol."""

__version__ = "0.1.0"
