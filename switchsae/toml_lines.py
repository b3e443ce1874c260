"""Where a key sits in a TOML file, for error messages (``tomllib`` keeps no line numbers).

A TOML file is scanned line by line for table headers (``[name]`` or ``[[name]]``) and
``key = value`` lines. Values spanning several lines (multi-line strings or arrays) are not
parsed, so a line inside one that happens to look like ``key =`` could be reported instead;
error messages only need a good pointer, not a parser.
"""
from __future__ import annotations

import re

_HEADER = re.compile(r"^\s*\[\[?\s*([^\[\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"""^\s*(?:"([^"]+)"|'([^']+)'|([A-Za-z0-9_-]+))\s*=""")


def key_line(text: str, table: str, index: int = 0, key: str | None = None) -> int:
    """1-based line of ``key`` in the ``index``-th occurrence of table ``table``.

    ``table`` is ``""`` for the top level (before any header). Without ``key``, or when the key
    is not found, the line of the table's header is returned (line 1 for the top level).
    """
    current, seen, header_line = "", {"": 0}, 1
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            seen[current] = seen.get(current, -1) + 1
            if current == table and seen[current] == index:
                header_line = number
            continue
        if key is None or current != table or seen.get(current) != index:
            continue
        found = _KEY.match(line)
        if found and key in found.groups():
            return number
    return header_line
