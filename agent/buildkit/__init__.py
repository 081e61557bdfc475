"""BuildKit, as the Docker Engine streams it: its progress messages and what they mean.

`control_pb2` and `ops_pb2` are generated from BuildKit's own .proto files by
scripts/gen-buildkit-proto (never edited by hand); `trace` turns their messages into the
steps and lines of a readable build log.
"""
