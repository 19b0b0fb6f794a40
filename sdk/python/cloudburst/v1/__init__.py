"""Generated gRPC and protobuf code for the cloudburst.v1 API (do not edit).

Regenerate with ``python tools/gen_protos.py``.
"""
