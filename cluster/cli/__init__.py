"""The `cave` command line: start and stop a local cluster, run commands in sandboxes."""
