"""The API's Ray Serve application, in three wings:

- `http/`: the ingress (app.py), the routes, the middleware (request ids, body limits, metrics,
  tracing), errors.py (the one place HTTP status codes live), MCP, and each replica's services.
- `sandboxes/`: the sandbox control plane: create, start, exec, files, stop, quotas, upkeep.
- `llm/`: model access: the engines' Serve deployments and the admin API's models.

The chat path itself (`ChatGateway`) is inference/gateway.py's. Beside the wings, what they all
use: `schemas.py`, the API's bodies, and `spans.py`, the services' tracing spans. `http` may
import the other two wings; `sandboxes` and `llm` import neither `http` nor each other
(tests/test_layers.py checks it).
"""
