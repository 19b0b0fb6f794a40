"""Generate the Python code for protos/ into sdk/python/cloudburst/v1.

Also writes cloudburst_grpc/cloudburst_v1.binpb, the descriptor set with source
information (comments) that the servers' reflection serves, and the Python code
for the one call of Consul's gRPC API the runtime makes
(cloudburst_grpc/security/consul_connectca.proto, beside it). Run from anywhere:
``python tools/gen_protos.py``. The output is committed; CI runs this script
again and fails when ``git diff`` shows a difference.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "sdk" / "python"
PACKAGE = OUT / "cloudburst" / "v1"
DESCRIPTOR_SET = ROOT / "cloudburst_grpc" / "cloudburst_v1.binpb"
#: Consul's Connect CA call, generated beside its .proto (Python only; not part of our API).
CONSUL_PROTO = "cloudburst_grpc/security/consul_connectca.proto"

INIT = '''"""Generated gRPC and protobuf code for the cloudburst.v1 API (do not edit).

Regenerate with ``python tools/gen_protos.py``.
"""
'''


def main() -> int:
    sources = sorted(
        str(p.relative_to(PROTOS)) for p in (PROTOS / "cloudburst" / "v1").glob("*.proto")
    )
    if PACKAGE.exists():
        shutil.rmtree(PACKAGE)
    PACKAGE.mkdir(parents=True)
    # protoc finds protoc-gen-mypy on PATH; it is installed beside this interpreter.
    bin_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={OUT}",
        f"--grpc_python_out={OUT}",
        f"--mypy_out={OUT}",
        f"--mypy_grpc_out={OUT}",
        *sources,
    ]
    code = protoc.main(args)
    if code != 0:
        print(f"protoc failed with exit code {code}", file=sys.stderr)
        return int(code)
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{well_known}",
            "--include_source_info",
            "--include_imports",
            f"--descriptor_set_out={DESCRIPTOR_SET}",
            *sources,
        ]
    )
    if code != 0:
        print(f"protoc failed to write the descriptor set, exit code {code}", file=sys.stderr)
        return int(code)
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{ROOT}",
            f"--python_out={ROOT}",
            f"--grpc_python_out={ROOT}",
            f"--mypy_out={ROOT}",
            f"--mypy_grpc_out={ROOT}",
            CONSUL_PROTO,
        ]
    )
    if code != 0:
        print(f"protoc failed on {CONSUL_PROTO}, exit code {code}", file=sys.stderr)
        return int(code)
    (PACKAGE / "__init__.py").write_text(INIT)
    (PACKAGE / "py.typed").write_text("")
    print(f"generated {len(sources)} protos into {PACKAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
