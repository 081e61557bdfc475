"""The `deploy-agent` command line: the daemon, and the API from a shell."""
