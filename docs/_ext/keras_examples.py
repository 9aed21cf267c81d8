"""A Griffe extension that reads Keras-style `Example:` sections.

Keras docstrings write an example as an `Example:` title, a blank line and
unindented `>>>` lines. Griffe's Google-style parser wants the section's
lines indented under the title, and the unindented `>>>` lines would render
as nested block quotes. This extension indents them under an `Examples:`
title before the docstring is parsed, so they render as Python console code.
"""

from __future__ import annotations

import re

import griffe

_EXAMPLE_TITLE = re.compile(r"^(?P<indent>[ ]*)Examples?:[ ]*$")
# Titles that end an unindented example: the Google-style sections Keras
# docstrings use after `Example:`.
_NEXT_SECTIONS = frozenset(
    {
        "args",
        "arguments",
        "attributes",
        "call arguments",
        "note",
        "notes",
        "raises",
        "references",
        "returns",
        "see also",
        "warning",
        "warnings",
        "yields",
    }
)


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_next_section(line: str, indent: int) -> bool:
    stripped = line.strip()
    return (
        _indent_of(line) == indent
        and stripped.endswith(":")
        and stripped[:-1].lower() in _NEXT_SECTIONS
    )


def indent_examples(text: str) -> str:
    """Returns `text` with each unindented `Example:` block indented."""
    lines = text.split("\n")
    out = []
    i = 0
    while i < len(lines):
        match = _EXAMPLE_TITLE.match(lines[i])
        start = i + 1
        while start < len(lines) and not lines[start].strip():
            start += 1
        if (
            match is None
            or start == len(lines)
            or _indent_of(lines[start]) > len(match["indent"])
        ):
            # Not a title, or an example already indented Google-style.
            out.append(lines[i])
            i += 1
            continue
        indent = len(match["indent"])
        end = start
        while end < len(lines) and not _is_next_section(lines[end], indent):
            end += 1
        body = lines[start:end]
        while body and not body[-1].strip():
            body.pop()
        out.append(f"{match['indent']}Examples:")
        out.extend(f"    {line}" if line.strip() else "" for line in body)
        out.append("")
        i = end
    return "\n".join(out)


class KerasExamples(griffe.Extension):
    """Indents Keras-style `Example:` sections before Griffe parses them."""

    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = indent_examples(obj.docstring.value)
