"""Table streams: committed Postgres row changes as State Protocol streams (issue 24 §1).

Pure parts: ``pgoutput`` (the decoder's messages), ``spec`` (definitions), ``values`` (JSON
encodings), ``plan`` (what a transaction appends where). I/O: ``catalog`` (what Relay keeps and
asks in Postgres), ``follower`` (the background service), ``cli`` (``relay tables``).
"""
