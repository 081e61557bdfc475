"""deploy-agent: builds, pushes and rolls out images on the nodes of a Docker Swarm cluster."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("deploy-agent")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
