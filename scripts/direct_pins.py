"""Reads `uv export` output on stdin and prints the pins of pyproject.toml's test group
only (not what they pull in), as constraints; with --runtime-names, prints the runtime
dependencies' names joined by `|` instead."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*")


def names(requirements: list[str]) -> list[str]:
    return [normal(match.group(0)) for r in requirements if (match := NAME.match(r))]


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


project = tomllib.loads(Path("pyproject.toml").read_text())
if sys.argv[1:] == ["--runtime-names"]:
    print("|".join(names(project["project"]["dependencies"])))
else:
    wanted = set(names(project["dependency-groups"]["test"]))
    for line in sys.stdin:
        pin = line.strip()
        if pin and not pin.startswith("#") and normal(pin.split("==")[0]) in wanted:
            print(pin)
