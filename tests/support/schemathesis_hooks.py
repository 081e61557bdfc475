"""Schemathesis hooks, for the tests and for its command line (SCHEMATHESIS_HOOKS names
this module): an upload's body (a tar, or a gzip of one) is sent as the bytes drawn."""

from __future__ import annotations

import schemathesis

schemathesis.serializer.alias(["application/x-tar", "application/gzip"], "application/octet-stream")
