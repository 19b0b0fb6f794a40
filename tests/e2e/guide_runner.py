"""Runs the user guide's examples as written, as a user's ``__main__`` would.

Usage: ``python guide_runner.py GUIDE.md ADDRESS``

Every ``>>>`` line of the guide's interactive blocks is executed in one
namespace; an expression's repr must equal the guide's expected output (a
trailing ``# comment`` in the guide is prose, not output). Blocks without
prompts (the class example) are executed whole. The guide's placeholders are
bound first: ``AWS_FUNCTION_ELB`` to ADDRESS with the guide's stray space,
``MY_IP`` to 127.0.0.1, and the undefined names of the class example.
"""

from __future__ import annotations

import re
import sys
from typing import Any

FENCE = re.compile(r"```[a-z0-9]*\n(.*?)```", re.S)


def blocks(text: str) -> list[str]:
    return FENCE.findall(text)


def run_interactive(block: str, namespace: dict[str, object]) -> int:
    checked = 0
    lines = block.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.startswith(">>> "):
            continue
        source = line[4:]
        expected = ""
        if i < len(lines) and lines[i].strip() and not lines[i].startswith((">>>", "#")):
            expected = lines[i].split("#", 1)[0].strip()
            i += 1
        try:
            code = compile(source, "<guide>", "eval")
        except SyntaxError:
            exec(compile(source, "<guide>", "exec"), namespace)
            continue
        value = eval(code, namespace)
        if expected:
            if repr(value) != expected:
                raise AssertionError(f"{source!r} gave {value!r}, the guide says {expected}")
            checked += 1
    return checked


def main() -> int:
    guide_path, address = sys.argv[1], sys.argv[2]
    namespace = globals()
    namespace.update(
        AWS_FUNCTION_ELB=address + " ",
        MY_IP="127.0.0.1",
        expensive_operation=lambda arg: None,
        init_arg=7,
        result="work done",
    )
    with open(guide_path) as f:
        text = f.read()
    checked = 0
    for block in blocks(text):
        if ">>>" in block:
            checked += run_interactive(block, namespace)
        elif "class " in block:
            namespace["cloud"] = namespace["cloudburst"]
            exec(compile(block, "<guide>", "exec"), namespace)
    cloud: Any = namespace["cloudburst"]
    # The class example, called one-shot and inside a DAG.
    assert cloud.exec_func("expensive_class", [1]).get(timeout=30) == "work done"
    assert cloud.register_dag(
        "class_dag", ["incr", "expensive_class"], [("incr", "expensive_class")]
    )
    assert cloud.call_dag("class_dag", {"incr": 1}, direct_response=True) == "work done"
    print(f"guide ok: {checked} outputs checked")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
