"""The Durable Streams protocol as pure code: no I/O, no clocks (callers pass ``now``)."""
