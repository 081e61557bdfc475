"""A deployment from submission to its final state: scheduling, the stages that build,
push, distribute and release, and where the sources come from."""
