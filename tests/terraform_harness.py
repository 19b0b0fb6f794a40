"""Tools for the deploy/terraform checks, each built or installed into the per-user cache.

Every tool comes from a package registry through a script under ``tools/`` that caches it
outside the repository by version (``make terraform-tools`` runs them all; CI does too), so
a test only pays for a build on a machine that never ran one.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TERRAFORM = ROOT / "deploy" / "terraform"
MODULES = TERRAFORM / "modules"
#: Modules with no provider: `tofu test` runs them for real in every CI run.
PROVIDER_FREE_MODULES = ("plan", "render")


def _script(path: Path, timeout: float = 3600) -> list[str]:
    """Run a tools/ install script; returns its stdout lines (the last ones name the tool)."""
    result = subprocess.run(
        ["bash", str(path)], capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{path.relative_to(ROOT)} failed:\n{result.stderr[-4000:]}")
    return result.stdout.strip().splitlines()


@cache
def tofu_binary() -> str:
    """The OpenTofu binary (tools/tofu/build.sh)."""
    return _script(ROOT / "tools" / "tofu" / "build.sh")[-1]


@cache
def cloud_init_binary() -> str:
    """A `cloud-init` command backed by Debian's unpacked package (tools/cloud-init/install.sh)."""
    return _script(ROOT / "tools" / "cloud-init" / "install.sh")[-1]


@cache
def tflint_paths() -> tuple[str, str]:
    """The tflint binary and the directory of its AWS ruleset plugin (tools/tflint/build.sh)."""
    tflint, plugin_dir = _script(ROOT / "tools" / "tflint" / "build.sh")[-2:]
    return tflint, plugin_dir


@cache
def checkov_binary() -> str:
    """checkov, in its own virtual environment (tools/checkov/install.sh)."""
    return _script(ROOT / "tools" / "checkov" / "install.sh")[-1]


@dataclass
class Tofu:
    """OpenTofu run with its state and plugin data in a scratch directory.

    ``TF_DATA_DIR`` keeps ``.terraform`` out of the repository, and the CLI configuration is
    an empty file of our own (this machine's environment may name one that does not exist).
    """

    binary: str
    scratch: Path

    def env(self) -> dict[str, str]:
        cli_config = self.scratch / "tofurc"
        cli_config.touch()
        return {
            **os.environ,
            "TF_DATA_DIR": str(self.scratch / "data"),
            "TF_CLI_CONFIG_FILE": str(cli_config),
            "TF_IN_AUTOMATION": "1",
            "TF_INPUT": "0",
            "CHECKPOINT_DISABLE": "1",
            "NO_COLOR": "1",
        }

    def run(self, cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """Run ``tofu ARGS`` in ``cwd``; the result, whatever the exit code."""
        return subprocess.run(
            [self.binary, *args],
            cwd=cwd,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def check(self, cwd: Path, *args: str, timeout: float = 600) -> str:
        """Run ``tofu ARGS`` and return stdout; raise with its output if it fails."""
        result = self.run(cwd, *args, timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(
                f"tofu {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
            )
        return result.stdout

    def apply_outputs(self, root: Path, var_file: Path | None = None) -> dict[str, Any]:
        """init + apply a provider-free root in ``root``; returns its outputs' values."""
        state = str(self.scratch / "terraform.tfstate")
        self.check(root, "init", "-backend=false", "-no-color")
        var_args = [f"-var-file={var_file}"] if var_file else []
        self.check(root, "apply", "-auto-approve", "-no-color", f"-state={state}", *var_args)
        raw = json.loads(self.check(root, "output", "-json", f"-state={state}"))
        return {name: value["value"] for name, value in raw.items()}
