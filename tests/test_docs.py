"""The docs: the site builds in strict mode, the README stays a newcomer's page, and the
references (config keys, API routes) say what the code does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec

from agent.config import Config
from agent.leader.api.openapi import document

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README_MAX_LINES = 200


def test_site_builds_strict(tmp_path: Path) -> None:
    """`mkdocs build --strict` succeeds: no broken link or anchor, no page left out of the
    navigation, no missing snippet."""
    env = os.environ | {"NO_MKDOCS_2_WARNING": "1"}  # the theme's banner, not a finding
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    site = tmp_path / "site"
    assert (site / "openapi.json").is_file()
    assert "deploy-agent deploy" in (site / "cli" / "index.html").read_text()


def test_readme_stays_short() -> None:
    """The README is a newcomer's first ten minutes: at most 200 lines."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def _keys(struct: type[msgspec.Struct], prefix: str = "") -> Iterator[str]:
    """Every config key the agent reads, dotted, with the section tables themselves."""
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    for field in info.fields:
        name = prefix + field.encode_name
        yield name
        inner = _struct_in(field.type)
        if inner is not None:
            yield from _keys(inner, name + ".")


def _struct_in(kind: msgspec.inspect.Type) -> type[msgspec.Struct] | None:
    """The struct a field holds: itself, optional, or a list of them."""
    if isinstance(kind, msgspec.inspect.StructType):
        return kind.cls
    if isinstance(kind, msgspec.inspect.UnionType):
        found = [s for s in map(_struct_in, kind.types) if s is not None]
        return found[0] if found else None
    if isinstance(kind, msgspec.inspect.VarTupleType | msgspec.inspect.ListType):
        return _struct_in(kind.item_type)
    return None


def _example_keys() -> set[str]:
    """The dotted keys config.example.toml shows, set or commented out."""
    keys: set[str] = set()
    section = ""
    for raw in (ROOT / "config.example.toml").read_text().splitlines():
        line = raw.lstrip("# ").strip()
        if table := re.fullmatch(r"\[\[?([a-z_.]+)\]\]?", line):
            section = table.group(1) + "."
            keys.add(table.group(1))
        elif key := re.match(r"([a-z_]+) = ", line):
            keys.add(_secret_form(section + key.group(1)))
    return keys


def _secret_form(key: str) -> str:
    """A secret's KEY_file and KEY_env are KEY given another way."""
    return re.sub(r"_(file|env)$", "", key)


def test_every_config_key_is_in_the_example() -> None:
    """config.example.toml, which the configuration reference shows as it is, names every
    key the config accepts (a secret by itself or as KEY_file/KEY_env)."""
    shown = _example_keys()
    missing = [key for key in _keys(Config) if _secret_form(key) not in shown]
    assert missing == [], f"keys missing from config.example.toml: {missing}"


def test_every_route_is_in_the_api_page() -> None:
    """docs/api.md lists every path of the OpenAPI document the leader serves."""
    page = (DOCS / "api.md").read_text()
    paths = document()["paths"]
    missing = [path for path in paths if not re.search(re.escape(path) + "[`?]", page)]
    assert missing == [], f"routes missing from docs/api.md: {missing}"
