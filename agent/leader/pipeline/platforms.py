"""Which platform to build for, and whether an image can run on the workers.

Workers report their engine's architecture in their Hello (Docker's names: amd64,
arm64, …). An image is built for the architecture the workers share, and is never sent to
a worker whose architecture it lacks: that worker's tasks would all die with "exec format
error" after a deployment reported success.
"""

from __future__ import annotations

from collections.abc import Iterable

from agent.errors import DeploymentError
from agent.leader.state.models import NodeRecord

# What `uname -m` says (a worker whose engine did not answer reports that) in Docker's
# words; Docker's own names map to themselves.
_DOCKER_ARCH = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "i386": "386",
    "i686": "386",
}
EMULATION_HINT = (
    "register emulation for that architecture on the build engine's host (binfmt_misc "
    "with QEMU, e.g. the tonistiigi/binfmt image), or build on a machine of that "
    "architecture (leader.build_server)"
)


def docker_arch(arch: str) -> str:
    return _DOCKER_ARCH.get(arch.lower(), arch.lower())


def node_archs(nodes: Iterable[NodeRecord]) -> dict[str, str]:
    """Each worker's architecture by name, for those that have reported one."""
    return {node.name: docker_arch(node.info.arch) for node in nodes if node.info.arch}


def target_platform(archs: dict[str, str], engine_arch: str) -> str | None:
    """The platform to build for: the workers' architecture where it is not the build
    engine's own (None: the engine's own). Workers of several architectures cannot share
    one image: that fails before anything is built."""
    wanted = set(archs.values())
    if len(wanted) > 1:
        raise DeploymentError(
            "platform_mismatch",
            "the workers run different architectures ("
            + _listing(archs)
            + "): one image is built for one architecture",
            hint="run the app's workers on one architecture",
        )
    if not wanted or wanted == {docker_arch(engine_arch)}:
        return None
    return f"linux/{wanted.pop()}"


def check_image(platform: str | None, archs: dict[str, str]) -> None:
    """Fail unless every worker can run an image built for `platform` (os/arch[/variant];
    None: not known, as for deployments recorded before platforms were)."""
    if platform is None:
        return
    arch = platform.split("/")[1] if platform.count("/") >= 1 else platform
    unfit = {name: node_arch for name, node_arch in archs.items() if node_arch != arch}
    if unfit:
        raise DeploymentError(
            "platform_mismatch",
            f"the image is built for {platform}, which these workers cannot run: "
            + _listing(unfit),
            hint="build for the workers' architecture: " + EMULATION_HINT,
        )


def _listing(archs: dict[str, str]) -> str:
    return ", ".join(f"{name} ({arch})" for name, arch in sorted(archs.items()))
