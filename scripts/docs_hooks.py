"""MkDocs hooks (mkdocs.yml names this file): the parts of the docs that the code itself
is the source of, made at build time so that they cannot drift from it.

- `openapi.json`: the leader's OpenAPI document, as `GET /v1/openapi.json` serves it;
- `config.example.toml` and `grafana/deploy-agent.json`: the repository's own files;
- in `cli.md`, `<!-- cli-reference -->` becomes every command's `--help`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

ROOT = Path(__file__).resolve().parents[1]
CLI_MARKER = "<!-- cli-reference -->"
COPIED = ("config.example.toml", "grafana/deploy-agent.json")


def on_files(files: Files, config: MkDocsConfig) -> Files:
    from agent.leader.api.openapi import document  # noqa: PLC0415 (the checkout's code)

    files.append(File.generated(config, "openapi.json", content=json.dumps(document(), indent=2)))
    for name in COPIED:
        files.append(File.generated(config, name, abs_src_path=str(ROOT / name)))
    return files


def on_page_markdown(markdown: str, page: Page, **_: Any) -> str:
    if CLI_MARKER not in markdown:
        return markdown
    return markdown.replace(CLI_MARKER, cli_reference())


def cli_reference() -> str:
    """Each command's and subcommand's `--help`, as a section of its own, at a fixed width."""
    from agent.cli.main import _parser  # noqa: PLC0415

    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal's width, else
    sections = []
    for name, parser in _commands(_parser()):
        sections.append(f"### {name}\n\n```text\n{parser.format_help().rstrip()}\n```\n")
    return "\n".join(sections)


def _commands(
    parser: argparse.ArgumentParser, prefix: str = "deploy-agent"
) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(prefix, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, f"{prefix} {name}")
    return found
