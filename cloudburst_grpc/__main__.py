"""``python -m cloudburst_grpc`` runs the ``cbgrpc`` command."""

from cloudburst_grpc.cli import main

raise SystemExit(main())
