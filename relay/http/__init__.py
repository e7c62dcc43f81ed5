"""The HTTP face of Relay: thin aiohttp handlers that parse, call the store, and render."""
