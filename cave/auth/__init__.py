"""API keys, webhook signatures and secret encryption: the pieces of CAVE's access control."""
