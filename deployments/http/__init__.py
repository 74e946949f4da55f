"""The HTTP side of the API: the ingress, its routes and middleware, MCP, and each replica's
services; the only place where errors become HTTP statuses (errors.py)."""
