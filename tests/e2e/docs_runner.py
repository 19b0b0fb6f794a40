"""Runs the ```python blocks of one Markdown file as a user's script would.

Usage: ``python docs_runner.py FILE.md [OLD=NEW ...]``

Every ```python block of the file runs, in order, in one fresh namespace
named ``__main__`` (so functions defined in the examples travel by value, as
a user's script's do). Before that, each ``OLD=NEW`` pair replaces OLD with
NEW in the text: this is how the examples' server address (``127.0.0.1:7600``,
what ``make serve`` listens on) becomes the test server's.

A top-level expression whose line ends in a comment holding a Python literal
(``incr(1).get()  # 2``) is checked: its value must equal that literal. Other
comments are prose. The script prints how many values it checked.
"""

from __future__ import annotations

import ast
import io
import re
import sys
import tokenize

FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(text: str) -> list[str]:
    """Return the bodies of the file's ```python blocks, in order."""
    return FENCE.findall(text)


def expected_values(source: str) -> dict[int, object]:
    """Map line numbers to the literal in the comment that ends the line, where there is one."""
    found: dict[int, object] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        try:
            found[token.start[0]] = ast.literal_eval(token.string[1:].strip())
        except (ValueError, SyntaxError):
            continue
    return found


def run_block(source: str, name: str, namespace: dict[str, object]) -> int:
    """Execute one block statement by statement; returns how many values it checked."""
    tree = ast.parse(source, name)
    expected = expected_values(source)
    checked = 0
    for statement in tree.body:
        line = statement.end_lineno or statement.lineno
        if isinstance(statement, ast.Expr) and line in expected:
            code = compile(ast.Expression(statement.value), name, "eval")
            value = eval(code, namespace)
            if value != expected[line]:
                text = ast.get_source_segment(source, statement)
                raise AssertionError(
                    f"{name}, line {line}: {text} gave {value!r}, the text says {expected[line]!r}"
                )
            checked += 1
        else:
            exec(compile(ast.Module([statement], []), name, "exec"), namespace)
    return checked


def main() -> int:
    path, pairs = sys.argv[1], sys.argv[2:]
    with open(path) as f:
        text = f.read()
    for pair in pairs:
        old, new = pair.split("=", 1)
        text = text.replace(old, new)
    blocks = python_blocks(text)
    namespace: dict[str, object] = {"__name__": "__main__"}
    checked = 0
    for i, block in enumerate(blocks, 1):
        checked += run_block(block, f"<{path} block {i}>", namespace)
    print(f"docs ok: {len(blocks)} blocks, {checked} values checked")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
