"""Arguments of the original API that this implementation refuses by name."""

from __future__ import annotations

from typing import Any

import pytest

from cloudburst._original import MULTI, NORMAL, check_consistency, reject_unsupported
from cloudburst.errors import NotSupportedError


@pytest.mark.parametrize("unused", [None, False, [], (), ""])
def test_the_not_used_values_are_accepted(unused: Any) -> None:
    reject_unsupported("register_dag", gpu_functions=unused)


@pytest.mark.parametrize("used", [["f"], True, object(), 1])
def test_any_other_value_is_refused_by_name(used: Any) -> None:
    with pytest.raises(NotSupportedError, match=r"call_dag\(dry_run=\.\.\.\)") as info:
        reject_unsupported("call_dag", continuation=None, dry_run=used)
    assert isinstance(info.value, NotImplementedError)
    assert info.value.metadata == {"argument": "dry_run"}


def test_only_the_default_consistency_is_accepted() -> None:
    check_consistency("call_dag", None)
    check_consistency("call_dag", NORMAL)
    for other in (MULTI, "MULTI", 2.5):
        with pytest.raises(NotSupportedError, match="consistency"):
            check_consistency("call_dag", other)
