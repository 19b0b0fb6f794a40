"""What the original Cloudburst API accepted and this implementation does not offer.

Programs ported from the original pass these arguments; silently ignoring one
would run the program differently than its author meant, so each raises
:class:`~cloudburst.errors.NotSupportedError` naming it. The values that mean
"not used" (the original's defaults) are accepted.
"""

from __future__ import annotations

from typing import Any

from cloudburst.errors import NotSupportedError

#: The original's default consistency mode (``cloudburst.shared.proto``'s NORMAL).
NORMAL = 0
#: The original's multi-key causal consistency mode, which this implementation lacks.
MULTI = 1


def reject_unsupported(method: str, **arguments: Any) -> None:
    """Raise for the first argument given a value other than "not used".

    Raises:
        NotSupportedError: Naming ``method`` and the argument.
    """
    for name, value in arguments.items():
        if value is None or value is False or (_sized(value) and not value):
            continue
        raise NotSupportedError(
            f"{method}({name}=...) is an argument of the original Cloudburst that "
            f"cloudburst-grpc does not implement; leave it out (see docs/porting.md)",
            {"argument": name},
        )


def check_consistency(method: str, consistency: Any) -> None:
    """Accept the default consistency mode only.

    Raises:
        NotSupportedError: ``consistency`` asks for another mode.
    """
    if consistency is None or (isinstance(consistency, int) and consistency == NORMAL):
        return
    raise NotSupportedError(
        f"{method}(consistency={consistency!r}): only the default consistency (NORMAL) is "
        "implemented; leave the argument out (see docs/porting.md)",
        {"argument": "consistency"},
    )


def _sized(value: Any) -> bool:
    return hasattr(value, "__len__")
