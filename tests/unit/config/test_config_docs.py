"""The configuration file in docs/operations.md holds every setting, each at its default."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

from cloudburst_grpc.config import Config, load_config

OPERATIONS = Path(__file__).resolve().parents[3] / "docs" / "operations.md"


def documented_toml() -> str:
    blocks = re.findall(r"^```toml\n(.*?)^```", OPERATIONS.read_text(), re.S | re.M)
    assert len(blocks) == 1, "docs/operations.md should show one configuration file"
    return str(blocks[0])


def test_the_documented_file_names_every_section_and_field() -> None:
    data = tomllib.loads(documented_toml())
    defaults = Config()
    sections = {f.name for f in dataclasses.fields(defaults)}
    assert set(data) == sections
    for section in sections:
        fields = {f.name for f in dataclasses.fields(getattr(defaults, section))}
        assert set(data[section]) == fields, section


def test_the_documented_file_gives_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "cbgrpc.toml"
    path.write_text(documented_toml())
    config = load_config(path, environ={})
    # The docs spell the data directory as it is without XDG_DATA_HOME.
    home_default = Path("~/.local/share/cloudburst-grpc").expanduser()
    assert config.kvs.data_dir == home_default
    expected = dataclasses.replace(
        Config(), kvs=dataclasses.replace(Config().kvs, data_dir=home_default)
    )
    assert config == expected
