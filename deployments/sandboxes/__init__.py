"""The sandbox control plane: the sandboxes' records, their actors, execs, files, quotas, upkeep."""
