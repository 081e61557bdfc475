"""Scrubbing secrets out of records that an earlier release stored with them.

Pure functions over stored documents, for the store's schema migrations to apply to each
record: they never touch the store themselves.
"""

from __future__ import annotations

import copy
from typing import Any

from agent.urls import without_userinfo


def scrub_git_userinfo(doc: dict[str, Any]) -> dict[str, Any]:
    """A stored deployment doc (the `doc` column, decoded) with the user name and
    password left out of its git URL. A URL that had them marks the record
    `git_credentials`, so that a clone it still needs fails as `source_unavailable`
    (submit again) instead of trying without them. A doc without any is returned as it
    was; the given doc is never changed."""
    git = (doc.get("request") or {}).get("git")
    url = git.get("url") if isinstance(git, dict) else None
    if not isinstance(url, str):
        return doc
    try:
        clean = without_userinfo(url)
    except ValueError:  # not a URL that can be read: nothing of it can be told safe
        clean = "(an unreadable URL)"
    if clean == url:
        return doc
    scrubbed = copy.deepcopy(doc)
    scrubbed["request"]["git"]["url"] = clean
    scrubbed["git_credentials"] = True
    return scrubbed
