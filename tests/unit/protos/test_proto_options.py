"""Every .proto file sets the options other languages need, the same way (docs/protocol.md)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[3]
FILES = sorted(p.stem for p in (ROOT / "protos" / "cloudburst" / "v1").glob("*.proto"))
SHARED = {
    "go_package": "cloudburst-grpc/sdk/go/cloudburst/v1;cloudburstv1",
    "java_package": "com.cloudburst.v1",
    "java_multiple_files": True,
    "csharp_namespace": "Cloudburst.V1",
    "objc_class_prefix": "CXX",
    "php_namespace": "Cloudburst\\V1",
    "ruby_package": "Cloudburst::V1",
}


@pytest.mark.parametrize("stem", FILES)
def test_every_file_sets_the_same_language_options(stem: str) -> None:
    module = importlib.import_module(f"cloudburst.v1.{stem}_pb2")
    proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(proto)
    options = proto.options
    for name, value in SHARED.items():
        assert getattr(options, name) == value, f"{stem}.proto: option {name}"
    outer = "".join(part.capitalize() for part in stem.split("_")) + "Proto"
    assert options.java_outer_classname == outer


def test_every_proto_file_is_checked() -> None:
    assert len(FILES) >= 10
