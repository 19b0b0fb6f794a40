"""Sampling profiles with py-spy, summarized into the functions and areas where time goes.

py-spy records in ``--gil`` mode: each sample is the stack of the thread that
holds the GIL, so the counts say where Python-level CPU goes (time in native
code that released the GIL, such as grpc core's I/O, is not counted). Samples
are taken without pausing the process (``--nonblocking``), so profiling barely
slows it.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import log

#: Where a frame's file belongs, first match wins (paths as py-spy prints them).
AREAS: list[tuple[str, str]] = [
    ("bench/", "bench (workload code)"),
    ("cloudburst_grpc/", "product: cloudburst_grpc"),
    ("executors/", "product: executors"),
    ("kvs/", "product: kvs"),
    ("cloudburst/", "product: SDK (cloudburst)"),
    ("grpc/", "grpc (Python layer)"),
    ("google/protobuf", "protobuf"),
    ("cloudpickle", "pickling"),
    ("pickle", "pickling"),
    ("asyncio/", "asyncio"),
    ("concurrent/futures", "threads: concurrent.futures"),
    ("threading.py", "threads: threading"),
    ("queue.py", "threads: queue"),
    ("selectors.py", "asyncio"),
]
PRODUCT_PREFIXES = ("cloudburst_grpc/", "executors/", "kvs/", "cloudburst/")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass
class Profile:
    """One process's profile, summarized."""

    label: str
    process: str
    pid: int
    seconds: float
    rate: int
    samples: int = 0
    raw_path: str = ""
    error: str | None = None
    top_self: list[tuple[str, int]] = field(default_factory=list)
    top_product_inclusive: list[tuple[str, int]] = field(default_factory=list)
    by_area: list[tuple[str, int]] = field(default_factory=list)
    by_thread: list[tuple[str, int]] = field(default_factory=list)
    hot_lines: list[tuple[str, int]] = field(default_factory=list)


def pyspy() -> str | None:
    """The py-spy executable next to this interpreter, or on PATH."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def area_of(file: str) -> str:
    for prefix, area in AREAS:
        if prefix in file:
            return area
    return "other"


def _parse_frame(frame: str) -> tuple[str, str, str]:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), "", ""
    return match["func"], match["file"], match["line"] or ""


def summarize(profile: Profile, text: str, top: int = 15) -> None:
    """Fill ``profile`` from py-spy's raw (collapsed stack) output."""
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    lines: collections.Counter[str] = collections.Counter()
    total = 0
    for row in text.splitlines():
        stack, _, count_text = row.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = "?"
        if frames and frames[0].startswith("thread ("):
            thread = re.sub(r"^thread \(\d+\):\s*", "", frames[0]).strip('" ')
            thread = re.sub(r"_\d+$", "_N", thread)  # pool threads: one row per pool
            frames = frames[1:]
        if frames and frames[0].startswith("process "):
            frames = frames[1:]
        if not frames:
            continue
        total += count
        threads[thread] += count
        func, file, line = _parse_frame(frames[-1])
        self_time[f"{func} ({file})"] += count
        lines[f"{func} ({file}:{line})"] += count
        areas[area_of(file)] += count
        seen: set[str] = set()
        for frame in frames:
            func, file, _ = _parse_frame(frame)
            if file.startswith(PRODUCT_PREFIXES) or "/cloudburst" in file:
                name = f"{func} ({file})"
                if name not in seen:
                    seen.add(name)
                    inclusive[name] += count
    profile.samples = total
    profile.top_self = self_time.most_common(top)
    profile.top_product_inclusive = inclusive.most_common(top)
    profile.by_area = areas.most_common()
    profile.by_thread = threads.most_common(8)
    profile.hot_lines = lines.most_common(top)


def record(
    label: str,
    targets: dict[str, int],
    drive: Callable[[], None],
    seconds: float,
    out_dir: Path,
    rate: int = 250,
) -> list[Profile]:
    """Profile every process in ``targets`` (name -> pid) while ``drive`` runs for ``seconds``.

    ``drive`` is called repeatedly (it should make a few calls) until the time is up.
    """
    profiles = [Profile(label, name, pid, seconds, rate) for name, pid in targets.items()]
    spy = pyspy()
    if spy is None:
        for profile in profiles:
            profile.error = "py-spy is not installed"
        return profiles
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower()
    running: list[tuple[Profile, subprocess.Popen[bytes]]] = []
    try:
        for profile in profiles:
            path = out_dir / f"{slug}--{profile.process}.txt"
            profile.raw_path = str(path)
            argv = [
                spy, "record", "--pid", str(profile.pid), "--duration", str(max(1, round(seconds))),
                "--rate", str(rate), "--format", "raw", "--output", str(path),
                "--gil", "--threads", "--nonblocking",
            ]  # fmt: skip
            running.append(
                (
                    profile,
                    subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
                )
            )
        time.sleep(0.3)  # py-spy attaches
        end = time.monotonic() + seconds + 0.5
        while time.monotonic() < end:
            drive()
        for profile, proc in running:
            try:
                _, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            path = Path(profile.raw_path)
            if proc.returncode != 0 or not path.exists():
                profile.error = (
                    f"py-spy exited {proc.returncode}: {err.decode(errors='replace')[-300:]}"
                )
                continue
            summarize(profile, path.read_text(errors="replace"))
    finally:
        for _, proc in running:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    for profile in profiles:
        log(
            f"profile {label} / {profile.process}: {profile.samples} samples"
            + (f" ({profile.error})" if profile.error else "")
        )
    return profiles
