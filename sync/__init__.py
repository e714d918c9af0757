"""Store-and-forward: the SQLite store (outbox and local state) and, later, the cloud links."""
