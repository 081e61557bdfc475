"""The leader's HTTP API: routes, the bearer-token guard and JSON error bodies."""
