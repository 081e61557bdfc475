"""The leader: accepts deployments over HTTP, builds and pushes images, owns the state."""
