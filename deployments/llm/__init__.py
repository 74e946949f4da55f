"""Model access in the API: the engines' Serve deployments and the models added over the API."""
