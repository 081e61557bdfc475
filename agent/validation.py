"""msgspec's validation errors in the product's own words: the key at fault, dotted as a
person writes it, what it must be (the allowed values of a choice, what a pattern
stands for), what was given, and "did you mean" for a misspelt key.

Shared by the config loader and the API; it reads the schema, never a message's raw
value beyond quoting it back, and only a plain value (text, a number, true or false)
that no secret could be: never a whole table or list (an `env` map holds passwords),
nor anything under a key that may hold a secret (a password, a token, a URL: a webhook's
URL is its own credential), nor a value inside a map of the caller's keys.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import msgspec

_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_STEP = re.compile(r"\.([A-Za-z_][\w-]*)|\[(\d+)\]|\[(\.\.\.)\]")
# keys whose values are not quoted back (nor anything below them)
_UNQUOTED = re.compile(r"pass|secret|token|url|auth|key|cred|env|args|labels", re.I)
IN_A_MAP = "..."  # msgspec's step for a value of a map (`$.env[...]`)
_EXPECTED = re.compile(r"^Expected `(?P<type>\w+)`(?P<rest>.*)$", re.S)
_BOUND = re.compile(r"(?P<op>>=|<=|>|<) (?P<n>[\d.]+)")

_TYPE_WORDS = {
    "int": "a whole number",
    "float": "a number",
    "str": "text",
    "bool": "true or false",
    "array": "a list",
    "object": "a table",
    "null": "nothing",
}
_BOUND_WORDS = {">=": "at least", "<=": "at most", ">": "greater than", "<": "less than"}
# What each pattern of the schema stands for, in words.
PATTERNS = {
    r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$": "an app name: 1 to 63 lowercase letters, "
    "digits and '-', starting and ending with a letter or a digit",
    r"^https?://": "an http:// or https:// URL",
    r"^ssh://[^@/]+@[^/]+$": "ssh://USER@HOST or ssh://USER@HOST:PORT",
}

Path = tuple[str | int, ...]


def explain(
    exc: msgspec.ValidationError,
    schema: type[Any],
    given: Any,
    *,
    object_word: str = "a table",
    within: str = "",
) -> tuple[str, str]:
    """(key, message): where the error is, dotted (`leader.webhooks[0].url`, "" for the
    top level), and what is wrong there, in words. A mapping is `object_word`: a table
    in TOML, an object in JSON. `within` is the key `given` itself sits at, if any."""
    found = _AT.match(str(exc))
    assert found is not None  # the pattern matches any text
    what, path = found["what"], _path(found["path"] or "")
    kind = _type_at(msgspec.inspect.type_info(schema), path)
    quotable = _quotable_path(path) and not _UNQUOTED.search(within)
    value = _value_at(given, path) if quotable else HIDDEN
    words = _words(what, kind, value).replace(_TYPE_WORDS["object"], object_word)
    return _dotted(path), words


def _path(text: str) -> Path:
    return tuple(int(m[2]) if m[2] else (m[1] or m[3]) for m in _STEP.finditer(text))


def _quotable_path(path: Path) -> bool:
    return not any(
        step == IN_A_MAP or (isinstance(step, str) and _UNQUOTED.search(step)) for step in path
    )


def _dotted(path: Path) -> str:
    text = ""
    for step in path:
        if isinstance(step, int) or step == IN_A_MAP:
            text += f"[{step}]"
        else:
            text += f".{step}" if text else step
    return text


def _type_at(kind: msgspec.inspect.Type | None, path: Path) -> msgspec.inspect.Type | None:
    for step in path:
        kind = _inside(kind, step)
    return _unwrapped(kind)


def _inside(kind: msgspec.inspect.Type | None, step: str | int) -> msgspec.inspect.Type | None:
    kind = _unwrapped(kind)
    if isinstance(kind, msgspec.inspect.DictType) and step == IN_A_MAP:
        return kind.value_type
    if isinstance(kind, msgspec.inspect.StructType) and isinstance(step, str):
        return next((f.type for f in kind.fields if f.encode_name == step), None)
    if isinstance(kind, msgspec.inspect.VarTupleType | msgspec.inspect.ListType):
        return kind.item_type
    if isinstance(kind, msgspec.inspect.DictType):
        return kind.value_type
    return None


def _unwrapped(kind: msgspec.inspect.Type | None) -> msgspec.inspect.Type | None:
    """An optional value's own type (`X | None` is X here)."""
    if isinstance(kind, msgspec.inspect.UnionType):
        rest = [t for t in kind.types if not isinstance(t, msgspec.inspect.NoneType)]
        return rest[0] if len(rest) == 1 else kind
    return kind


def _value_at(given: Any, path: Path) -> Any:
    for step in path:
        try:
            given = given[step]
        except (KeyError, IndexError, TypeError):
            return None
    return given


def _words(what: str, kind: msgspec.inspect.Type | None, value: Any) -> str:
    if found := re.fullmatch(r"Object contains unknown field `(.+)`", what):
        fields = kind.fields if isinstance(kind, msgspec.inspect.StructType) else ()
        return unknown_key(found[1], [f.encode_name for f in fields])
    if found := re.fullmatch(r"Object missing required field `(.+)`", what):
        return required_key(found[1])
    if what.startswith("Invalid enum value"):
        return f"must be one of {_choices(kind)}{_not(value)}"
    if found := _EXPECTED.match(what):
        return _expected(found["type"], found["rest"], value)
    return what


def unknown_key(name: str, known: list[str]) -> str:
    """An unknown key, with the keys of its table and the nearest one."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"; did you mean `{close[0]}`?" if close else ""
    listed = f" (known: {', '.join(known)})" if known else ""
    return f"unknown key `{name}`{hint}{listed}"


def required_key(name: str) -> str:
    return f"`{name}` is required here"


def _choices(kind: msgspec.inspect.Type | None) -> str:
    values = getattr(kind, "values", None) or ()
    return ", ".join(_quoted(v) for v in values) or "the allowed values"


def _expected(type_name: str, rest: str, value: Any) -> str:
    noun = _TYPE_WORDS.get(type_name, type_name)
    rest = rest.strip()
    if rest.startswith(", got"):
        got = rest.removeprefix(", got `").rstrip("`")
        shown = f" ({_quoted(value)})" if _plain(value) else ""
        return f"must be {noun}, not {_TYPE_WORDS.get(got, got)}{shown}"
    if found := re.fullmatch(r"matching regex '(.*)'", rest):
        shape = PATTERNS.get(found[1], f"text matching {found[1]}")
        return f"must be {shape}{_not(value)}"
    if rest.startswith("of length"):
        unit = "characters" if type_name == "str" else "items"
        return f"must be {noun} of {_bounds(rest)} {unit}"
    if rest:
        return f"must be {noun}, {_bounds(rest)}{_not(value)}"
    return f"must be {noun}"


def _bounds(text: str) -> str:
    return " and ".join(f"{_BOUND_WORDS[m['op']]} {_number(m['n'])}" for m in _BOUND.finditer(text))


def _number(text: str) -> str:
    return text.removesuffix(".0")


class _Hidden:
    """A value that is not quoted back."""


HIDDEN = _Hidden()
QUOTED_CHARS = 60


def _plain(value: Any) -> bool:
    return isinstance(value, str | int | float | bool) and not isinstance(value, _Hidden)


def _not(value: Any) -> str:
    """`, not VALUE` for a plain value, else nothing."""
    return f", not {_quoted(value)}" if _plain(value) else ""


def _quoted(value: Any) -> str:
    if isinstance(value, str):
        return repr(value if len(value) <= QUOTED_CHARS else value[:QUOTED_CHARS] + "…")
    return str(msgspec.json.encode(value), "utf-8") if value is not None else "nothing"
