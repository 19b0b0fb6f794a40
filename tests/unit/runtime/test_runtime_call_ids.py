"""Call ids (cloudburst_grpc.call_ids): unique, also across a fork."""

from __future__ import annotations

import os

from cloudburst_grpc.call_ids import new_call_id


def test_new_call_ids_are_unique_hex() -> None:
    ids = {new_call_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(int(i, 16) >= 0 and len(i) == 32 for i in ids)


def test_call_ids_are_unique_hex_and_differ_in_a_forked_child() -> None:
    ids = {new_call_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report one id and leave at once
        os.write(write_end, new_call_id().encode())
        os._exit(0)
    os.close(write_end)
    try:
        child_id = os.read(read_end, 64).decode()
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    parent_id = new_call_id()
    assert len(child_id) == 32
    assert child_id[:20] != parent_id[:20], "a forked child must draw its own prefix"
