"""Fixtures that start the Go and TypeScript clients' drivers (e2e/drivers.py).

Each driver a test starts is ended at teardown, also when the test fails.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from e2e.drivers import Driver, Launcher, go_build, ts_program


@pytest.fixture(scope="session")
def go_driver(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The command of the Go client's driver, built once a run."""
    return go_build("./internal/clientdriver", tmp_path_factory.mktemp("go"))


def _launcher(command: list[str]) -> Iterator[Launcher]:
    started: list[Driver] = []

    def start(address: str, mode: str = "default", env: dict[str, str] | None = None) -> Driver:
        driver = Driver([*command, address, mode], env)
        started.append(driver)
        return driver

    try:
        yield start
    finally:
        for driver in started:
            driver.close()


@pytest.fixture
def launch_go(go_driver: list[str]) -> Iterator[Launcher]:
    """Starts Go drivers: ``launch_go(address, mode="default", env=None)``."""
    yield from _launcher(go_driver)


@pytest.fixture
def launch_ts() -> Iterator[Launcher]:
    """Starts TypeScript drivers: ``launch_ts(address, mode="default", env=None)``."""
    yield from _launcher(ts_program("driver"))


@pytest.fixture(params=["go", "ts"])
def launch(request: pytest.FixtureRequest) -> Launcher:
    """Starts drivers of each client in turn: ``launch(address, mode="default", env=None)``."""
    launcher: Launcher = request.getfixturevalue(f"launch_{request.param}")
    return launcher
