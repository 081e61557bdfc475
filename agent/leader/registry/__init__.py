"""Registry credentials: the stored versions, how they are set and refreshed, and the
image references they apply to."""
