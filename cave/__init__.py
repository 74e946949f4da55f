"""CAVE's core: errors, settings parsing, the database, keys and audit; `cave.client` is the SDK.

This file, `cave/errors.py` and `cave/client/` are the client distribution (cave-sandbox-client,
clients/python); the server distribution (cave-sandbox) ships the rest of `cave` and depends on it.
"""

__version__ = "0.1.0"
