"""The worker: holds one link to the leader, keeps its credentials in memory, pulls images."""
