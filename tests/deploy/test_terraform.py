"""deploy/terraform, checked with the real tools: OpenTofu's formatter and test runner, then
the rendered artefacts through `consul validate`, `cloud-init schema` and
`systemd-analyze verify`, and finally the rendered roles started on loopback as a cluster.

The provider-free modules (plan, render) hold the logic; scratch roots render every role as
on AWS, and again with loopback addresses, free ports and this machine's paths.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cloudburst import CloudburstConnection
from cloudburst.transport import ClientSecurity
from cloudburst_grpc.cli import build_parser
from harness import consul_binary, free_ports, wait_for_pool
from terraform_harness import (
    MODULES,
    PROVIDER_FREE_MODULES,
    TERRAFORM,
    Tofu,
    checkov_binary,
    cloud_init_binary,
    tflint_paths,
    tofu_binary,
)
from valkey_cluster import ValkeyCluster

#: The host's systemd units, copied into the root that `systemd-analyze verify` checks.
SYSTEMD_UNITS = Path("/usr/lib/systemd/system")

ROLES = ("consul_server", "scheduler", "executor", "kvs")
CBGRPC_ROLES = ("scheduler", "executor", "kvs")

#: The scratch root that renders every role as on AWS, the cbgrpc roles again with TLS files,
#: and every role with certificates from Consul's CA.
RENDER_ROOT = """
locals {
  roles = toset(["consul_server", "scheduler", "executor", "kvs"])
}

module "aws" {
  source           = "MODULE"
  for_each         = local.roles
  role             = each.key
  cluster_name     = "demo"
  region           = "eu-west-1"
  parameter_prefix = "/cloudburst/demo"
  consul = {
    join_tag = { key = "cloudburst:consul-join", value = "demo" }
  }
  ports   = { scheduler = 7600, executor = 7601, kvs = 7602, metrics = 9464 }
  valkey  = { enabled = each.key == "kvs", endpoint = "clustercfg.demo.euw1.cache.amazonaws.com" }
  otel    = { endpoint = "http://otel-collector.internal:4317" }
  metrics = { autoscaling_group = "demo-executor" }
}

module "aws_tls" {
  source           = "MODULE"
  for_each         = toset(["scheduler", "executor", "kvs"])
  role             = each.key
  cluster_name     = "demo"
  region           = "eu-west-1"
  parameter_prefix = "/cloudburst/demo"
  consul = {
    join_tag = { key = "cloudburst:consul-join", value = "demo" }
  }
  ports    = { scheduler = 7600, executor = 7601, kvs = 7602, metrics = 9464 }
  valkey   = { enabled = each.key == "kvs", endpoint = "clustercfg.demo.euw1.cache.amazonaws.com" }
  tls_mode = "files"
}

module "aws_consul" {
  source           = "MODULE"
  for_each         = local.roles
  role             = each.key
  cluster_name     = "demo"
  region           = "eu-west-1"
  parameter_prefix = "/cloudburst/demo"
  consul = {
    join_tag = { key = "cloudburst:consul-join", value = "demo" }
  }
  ports    = { scheduler = 7600, executor = 7601, kvs = 7602, metrics = 9464 }
  valkey   = { enabled = each.key == "kvs", endpoint = "clustercfg.demo.euw1.cache.amazonaws.com" }
  tls_mode = "consul"
}

output "aws" {
  value = module.aws
}

output "aws_consul" {
  value = module.aws_consul
}

output "aws_tls" {
  value = module.aws_tls
}

"""


#: The scratch root that renders every role for this machine: loopback addresses, ports free
#: just before the cluster starts, and this machine's paths.
LOOPBACK_ROOT = """
variable "loopback" {
  type = any
}

locals {
  roles = toset(["consul_server", "scheduler", "executor", "kvs"])
}

module "loopback" {
  source           = "MODULE"
  for_each         = local.roles
  role             = each.key
  cluster_name     = "loopback"
  region           = "eu-west-1"
  parameter_prefix = "/cloudburst/loopback"
  consul = {
    server_count = 1
    join_tag     = { key = "cloudburst:consul-join", value = "loopback" }
    retry_join   = []
    bind_addr    = "127.0.0.1"
    ports        = var.loopback.consul_ports
  }
  ports     = merge(var.loopback.ports, { metrics = var.loopback.metrics[each.key] })
  bind_host = "127.0.0.1"
  valkey    = { enabled = each.key == "kvs", endpoint = "127.0.0.1" }
  metrics   = { autoscaling_group = "loopback-executor" }
  paths     = var.loopback.paths
  tls_mode  = var.loopback.tls_mode
}

output "loopback" {
  value = module.loopback
}
"""


@dataclass
class Rendered:
    """The render module's outputs for every role as on AWS (plain, with TLS files, and with
    certificates from Consul's CA)."""

    aws: dict[str, dict[str, Any]]
    aws_tls: dict[str, dict[str, Any]]
    aws_consul: dict[str, dict[str, Any]]
    scratch: Path
    consul: str


@pytest.fixture(scope="module")
def tofu(tmp_path_factory: pytest.TempPathFactory) -> Tofu:
    return Tofu(tofu_binary(), tmp_path_factory.mktemp("tofu"))


@pytest.fixture(scope="module")
def rendered(tofu: Tofu, tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    scratch = tmp_path_factory.mktemp("render")
    root = scratch / "root"
    root.mkdir()
    (root / "main.tf").write_text(RENDER_ROOT.replace("MODULE", str(MODULES / "render")))
    outputs = tofu.apply_outputs(root)
    return Rendered(
        outputs["aws"], outputs["aws_tls"], outputs["aws_consul"], scratch, consul_binary()
    )


def render_loopback(
    scratch: Path, consul: str, tls_mode: str = "none"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Render every role for this machine, on ports free right now; (outputs, inputs)."""
    root = scratch / "root"
    root.mkdir(parents=True)
    (root / "main.tf").write_text(LOOPBACK_ROOT.replace("MODULE", str(MODULES / "render")))
    ports = free_ports(11)
    inputs = {
        "tls_mode": tls_mode,
        "consul_ports": {
            "server_rpc": ports[0],
            "serf_lan": ports[1],
            "serf_wan": ports[2],
            "http": ports[3],
            "dns": -1,
            "grpc": ports[10],
        },
        "ports": {"scheduler": ports[4], "executor": ports[5], "kvs": ports[6]},
        "metrics": {
            "consul_server": 0,
            "scheduler": ports[7],
            "executor": ports[8],
            "kvs": ports[9],
        },
        "paths": {
            "venv": str(Path(sys.executable).parent.parent),
            "config_dir": str(scratch / "etc"),
            "consul_bin": consul,
            "consul_config_dir": str(scratch / "consul.d"),
            "consul_data_dir": str(scratch / "consul-data"),
        },
    }
    var_file = scratch / "loopback.tfvars.json"
    var_file.write_text(json.dumps({"loopback": inputs}))
    outputs = Tofu(tofu_binary(), scratch).apply_outputs(root, var_file)
    return outputs["loopback"], inputs


# -- OpenTofu itself ---------------------------------------------------------------------------


def test_every_file_is_formatted(tofu: Tofu) -> None:
    result = tofu.run(TERRAFORM, "fmt", "-check", "-recursive", "-diff", "-no-color")
    assert result.returncode == 0, f"run `tofu fmt -recursive deploy/terraform`:\n{result.stdout}"


@pytest.mark.parametrize("module", PROVIDER_FREE_MODULES)
def test_provider_free_module_tests_pass(tofu: Tofu, module: str) -> None:
    """`tofu test` runs the module for real; its assertions are in the module's tests/."""
    path = MODULES / module
    tofu.check(path, "init", "-backend=false", "-no-color")
    output = tofu.check(path, "test", "-no-color")
    match = re.search(r"Success! (\d+) passed, 0 failed\.", output)
    assert match and int(match.group(1)) >= 5, output
    # Every run block ran (none skipped, none failed).
    runs = re.findall(r'run "([^"]+)"\.\.\. (\w+)', output)
    assert runs and all(status == "pass" for _, status in runs), output


# -- linters ------------------------------------------------------------------------------------


def run_tflint(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    tflint, plugin_dir = tflint_paths()
    return subprocess.run(
        [tflint, *args],
        cwd=directory,
        env={**os.environ, "TFLINT_PLUGIN_DIR": plugin_dir},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_tflint_with_the_aws_ruleset_passes_on_every_module() -> None:
    config = TERRAFORM / ".tflint.hcl"
    version = run_tflint(TERRAFORM, "--version", f"--config={config}")
    assert "ruleset.aws (0.48.0)" in version.stdout, version.stdout + version.stderr
    result = run_tflint(TERRAFORM, "--recursive", f"--config={config}", "--format=compact")
    assert result.returncode == 0, result.stdout + result.stderr


def test_tflint_catches_what_the_aws_ruleset_knows(tmp_path: Path) -> None:
    """The check above can fail: the AWS ruleset knows instance types."""
    (tmp_path / "main.tf").write_text(
        'resource "aws_instance" "x" {\n  ami           = "ami-12345678"\n'
        '  instance_type = "t9.enormous"\n}\n'
    )
    result = run_tflint(tmp_path, f"--config={TERRAFORM / '.tflint.hcl'}", "--format=compact")
    assert result.returncode != 0 and "aws_instance_invalid_type" in result.stdout


@pytest.mark.timeout(600)  # checkov takes ~15 s alone, a minute on a busy machine
def test_checkov_passes_with_every_skip_justified() -> None:
    result = subprocess.run(
        [checkov_binary(), "--config-file", str(TERRAFORM / ".checkov.yaml")],
        cwd=TERRAFORM,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
    report = result.stdout
    assert "Passed checks:" in report and "Failed checks: 0" in report, report[-4000:]
    # Every inline skip carries a reason after the check id.
    for path in TERRAFORM.rglob("*.tf"):
        for line in path.read_text().splitlines():
            if "checkov:skip=" in line:
                reason = line.split("checkov:skip=", 1)[1].partition(":")[2]
                assert reason.strip(), f"{path.name}: a skip without a reason: {line.strip()}"


# -- the rendered artefacts, through the real tools ---------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_user_data_passes_cloud_init_schema(rendered: Rendered, role: str) -> None:
    path = rendered.scratch / f"user-data-{role}.yaml"
    path.write_text(rendered.aws[role]["user_data"])
    result = subprocess.run(
        [cloud_init_binary(), "schema", "--config-file", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0 and "Valid cloud-config" in result.stdout, (
        result.stdout + result.stderr
    )


@pytest.mark.parametrize("role", ROLES)
def test_every_rendered_script_is_valid_bash(rendered: Rendered, role: str) -> None:
    scripts = rendered.aws[role]["scripts"]
    assert "/usr/local/sbin/cloudburst-bootstrap" in scripts
    for path, content in scripts.items():
        assert content.startswith("#!/bin/bash\n"), path
        result = subprocess.run(
            ["bash", "-n"], input=content, capture_output=True, text=True, timeout=30, check=False
        )
        assert result.returncode == 0, f"{path}: {result.stderr}"
    for variant, outputs in (("tls files", rendered.aws_tls), ("consul", rendered.aws_consul)):
        for path, content in outputs.get(role, {}).get("scripts", {}).items():
            result = subprocess.run(
                ["bash", "-n"],
                input=content,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert result.returncode == 0, f"{path} ({variant}): {result.stderr}"


def test_cloud_init_schema_catches_a_broken_user_data(rendered: Rendered) -> None:
    """The check above can fail: a wrongly typed field is reported."""
    user_data = rendered.aws["executor"]["user_data"]
    assert '"package_update": true' in user_data
    broken = user_data.replace('"package_update": true', '"package_update": "often"')
    path = rendered.scratch / "user-data-broken.yaml"
    path.write_text(broken)
    result = subprocess.run(
        [cloud_init_binary(), "schema", "--config-file", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0 and "package_update" in result.stdout + result.stderr


def write_secrets(directory: Path, consul: str, management: str, agent: str) -> None:
    """secrets.json as the boot script writes it (gossip key from `consul keygen`)."""
    key = subprocess.run(
        [consul, "keygen"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    tokens: dict[str, str] = {"agent": agent}
    if management:
        tokens["initial_management"] = management
    (directory / "secrets.json").write_text(json.dumps({"encrypt": key, "acl": {"tokens": tokens}}))


@pytest.mark.parametrize("variant", ["aws", "aws_consul"])
@pytest.mark.parametrize("role", ROLES)
def test_consul_validate_accepts_the_agent_configuration(
    rendered: Rendered, role: str, variant: str
) -> None:
    directory = rendered.scratch / f"validate-{variant}-{role}"
    directory.mkdir()
    (directory / "consul.json").write_text(getattr(rendered, variant)[role]["consul_config"])
    management = str(uuid.uuid4()) if role == "consul_server" else ""
    write_secrets(directory, rendered.consul, management, str(uuid.uuid4()))
    result = subprocess.run(
        [rendered.consul, "validate", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Configuration is valid!" in result.stdout


def test_consul_validate_catches_a_broken_configuration(rendered: Rendered) -> None:
    directory = rendered.scratch / "validate-broken"
    directory.mkdir()
    config = json.loads(rendered.aws["consul_server"]["consul_config"])
    config["retry_joinn"] = config.pop("retry_join")  # a misspelt key
    (directory / "consul.json").write_text(json.dumps(config))
    result = subprocess.run(
        [rendered.consul, "validate", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0 and "retry_joinn" in result.stdout + result.stderr


def lay_out(root: Path, cloud_config: dict[str, Any], executables: list[str]) -> list[Path]:
    """Write a role's files under ``root`` as cloud-init would; returns the unit files."""
    units = []
    for entry in cloud_config["write_files"]:
        path = root / entry["path"].lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(entry["content"])
        path.chmod(int(entry["permissions"], 8))
        if entry["path"].startswith("/etc/systemd/system/"):
            units.append(path)
    # systemd's own units (targets the ours are ordered against), as on the instance.
    shutil.copytree(SYSTEMD_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    for executable in executables:  # what the packages and the install script put there
        path = root / executable.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    return units


@pytest.mark.parametrize("role", ROLES)
def test_systemd_analyze_verifies_the_units(rendered: Rendered, role: str) -> None:
    systemd_analyze = shutil.which("systemd-analyze")
    assert systemd_analyze, "systemd-analyze is needed (Debian package systemd)"
    root = rendered.scratch / f"systemd-{role}"
    units = lay_out(
        root,
        rendered.aws[role]["cloud_config"],
        ["/usr/bin/consul", "/opt/cloudburst-grpc/bin/cbgrpc", "/bin/kill"],
    )
    assert len(units) >= 3
    result = subprocess.run(
        [systemd_analyze, "verify", "--man=no", f"--root={root}", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # Only complaints about the units under test count (the host's own units are not ours).
    ours = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if any(unit.name in line for unit in units)
    ]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


def test_systemd_analyze_catches_a_broken_unit(rendered: Rendered) -> None:
    systemd_analyze = shutil.which("systemd-analyze")
    assert systemd_analyze
    root = rendered.scratch / "systemd-broken"
    units = lay_out(root, rendered.aws["kvs"]["cloud_config"], ["/usr/bin/consul", "/bin/kill"])
    # No /opt/cloudburst-grpc/bin/cbgrpc: the KVS unit's ExecStart is not executable.
    kvs_unit = next(u for u in units if u.name == "cloudburst-kvs.service")
    result = subprocess.run(
        [systemd_analyze, "verify", "--man=no", f"--root={root}", str(kvs_unit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0 and "cbgrpc" in result.stdout + result.stderr


# -- the rendered commands against the CLI -------------------------------------------------------


def accepted_flags(command: str) -> set[str]:
    """The option strings `cbgrpc COMMAND` accepts today."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    sub = subparsers.choices[command]  # type: ignore[index]
    return {opt for action in sub._actions for opt in action.option_strings}


def exec_start(unit: str) -> list[str]:
    """The ExecStart of a unit, split as systemd would (no ${VAR} expansion)."""
    lines = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1, unit
    return shlex.split(lines[0].removeprefix("ExecStart="))


@pytest.mark.parametrize("role", CBGRPC_ROLES)
def test_rendered_commands_use_only_flags_the_cli_accepts(rendered: Rendered, role: str) -> None:
    for variant in (rendered.aws, rendered.aws_tls, rendered.aws_consul):
        command = variant[role]["command"]
        assert exec_start(variant[role]["units"][f"cloudburst-{role}.service"]) == command
        assert command[1] == role
        flags = {arg for arg in command[2:] if arg.startswith("--")}
        unknown = flags - accepted_flags(role)
        assert not unknown, f"flags `cbgrpc {role} --help` does not list: {unknown}"
        # Secrets (the Valkey URL holds its AUTH token) come from the environment file: a
        # command line is readable by every user of the host through /proc.
        assert "--valkey-url" not in flags, command
        assert not any("${" in arg for arg in command), command


def loopback_argv(command: list[str], env: dict[str, str]) -> list[str]:
    """The rendered command as systemd runs it (``${VAR}`` from the environment file)."""
    return [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], arg) for arg in command]


def test_the_rendered_toml_files_load_with_the_projects_config_loader(rendered: Rendered) -> None:
    from cloudburst_grpc.config import load_config

    for role in CBGRPC_ROLES:
        path = rendered.scratch / f"{role}.toml"
        path.write_text(rendered.aws[role]["cbgrpc_config"])
        config = load_config(path, environ={})
        assert config.server.port == {"scheduler": 7600, "executor": 7601, "kvs": 7602}[role]
        assert config.server.host == "0.0.0.0"
        assert config.server.metrics_port == 9464
        assert config.consul.address == "127.0.0.1:8500"
        assert config.security.tls_source == "files"
        # With certificates from Consul's CA, signed by a server the local agent names.
        path.write_text(rendered.aws_consul[role]["cbgrpc_config"])
        config = load_config(path, environ={})
        assert config.security.tls_source == "consul"
        assert config.security.consul_grpc_address == "servers:8502"
        assert config.consul.address == "127.0.0.1:8500"


# -- the rendered roles, started on loopback as a cluster ----------------------------------------


class Process:
    """A subprocess whose output is collected on a thread; killed by PID at teardown."""

    def __init__(self, argv: list[str], env: dict[str, str], name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not any(text in line for line in self.lines):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    raise AssertionError(
                        f"{self.name}: {text!r} not seen:\n" + "".join(self.lines[-40:])
                    )
                self.changed.wait(min(remaining, 1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class PortTaken(Exception):
    """A port chosen free was taken before the process bound it: start again on others."""


@dataclass
class LoopbackCluster:
    """The rendered roles running on this machine; every process is stopped by PID."""

    rendered: Rendered
    loopback: dict[str, dict[str, Any]]
    inputs: dict[str, Any]
    scratch: Path
    params: dict[str, str]
    management: str
    client_token: str = ""
    """With tls_mode = "consul": an admin token the schedulers' tokens file lists."""
    processes: list[Process] = field(default_factory=list)

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.inputs['consul_ports']['http']}"

    def consul_get(self, path: str, token: str | None = None, timeout: float = 10) -> Any:
        request = urllib.request.Request(f"http://{self.http}{path}")
        if token:
            request.add_header("X-Consul-Token", token)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)

    def start(self, argv: list[str], env: dict[str, str], name: str, ready: str) -> Process:
        """Start a process and wait for ``ready`` in its output."""
        process = Process(argv, env, name)
        self.processes.append(process)
        try:
            process.wait_for(ready)
        except AssertionError:
            if any("address already in use" in line.lower() for line in process.lines):
                raise PortTaken(name) from None
            raise
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


def fake_aws_cli(directory: Path, params: dict[str, str], calls: Path) -> Path:
    """An `aws` on PATH that answers `ssm get-parameter` from ``params`` and records
    `cloudwatch put-metric-data` calls: the one stand-in, for AWS itself."""
    store = directory / "parameters.json"
    store.write_text(json.dumps(params))
    script = directory / "aws"
    script.write_text(
        f"""#!{sys.executable}
import json, sys
args = sys.argv[1:]
if args[:2] == ["ssm", "get-parameter"]:
    name = args[args.index("--name") + 1]
    params = json.load(open({str(store)!r}))
    if name not in params:
        sys.exit("ParameterNotFound: " + name)
    print(params[name])
elif args[:2] == ["cloudwatch", "put-metric-data"]:
    with open({str(calls)!r}, "a") as f:
        f.write(json.dumps(args) + "\\n")
else:
    sys.exit("unexpected aws call: " + " ".join(args))
"""
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return directory


def run_script(content: str, path: Path, env: dict[str, str], timeout: float) -> str:
    path.write_text(content)
    path.chmod(0o755)
    result = subprocess.run(
        ["bash", str(path)], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{path.name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


PREFIX = "/cloudburst/loopback"


def start_loopback(
    rendered: Rendered,
    scratch: Path,
    valkey_url: str,
    started: list[LoopbackCluster],
    tls_mode: str = "none",
) -> LoopbackCluster:
    """Render for this machine and start Consul, its ACLs and the three roles, as the
    instances' units and boot scripts would (the `aws` CLI answered by a stand-in)."""
    loopback, inputs = render_loopback(scratch, rendered.consul, tls_mode)
    management = str(uuid.uuid4())
    params = {
        f"{PREFIX}/consul/management-token": management,
        f"{PREFIX}/consul/agent-token": str(uuid.uuid4()),
        **{f"{PREFIX}/consul/token/{r}": str(uuid.uuid4()) for r in CBGRPC_ROLES},
    }
    cluster = LoopbackCluster(rendered, loopback, inputs, scratch, params, management)
    started.append(cluster)
    bin_dir = fake_aws_cli(scratch, params, scratch / "metric-calls.jsonl")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CBGRPC_CONFIG"):
        env.pop(name, None)

    # Consul: configuration and secrets where the unit reads them, then its ExecStart.
    server = loopback["consul_server"]
    config_dir = Path(inputs["paths"]["consul_config_dir"])
    config_dir.mkdir(parents=True)
    Path(inputs["paths"]["consul_data_dir"]).mkdir(parents=True)
    (config_dir / "consul.json").write_text(server["consul_config"])
    write_secrets(config_dir, rendered.consul, management, params[f"{PREFIX}/consul/agent-token"])
    argv = exec_start(server["units"]["consul.service"])
    cluster.start(argv, env, "consul", "cluster leadership acquired")

    # The ACL set-up script, as every server runs it (policy files where it reads them).
    acl_script = server["scripts"]["/usr/local/sbin/consul-acl-init"]
    policy_dir = scratch / "consul-acl"
    policy_dir.mkdir()
    for name, rules in server["acl_policies"].items():
        (policy_dir / f"{name}.hcl").write_text(rules)
    acl_script = acl_script.replace("/etc/consul-acl", str(policy_dir))
    output = run_script(acl_script, scratch / "consul-acl-init", env, timeout=120)
    assert "policies, tokens and intentions in place" in output
    # It is idempotent: a second server running it changes nothing and succeeds.
    run_script(acl_script, scratch / "consul-acl-init", env, timeout=120)
    policies = {p["Name"] for p in cluster.consul_get("/v1/acl/policies", management)}
    assert set(server["acl_policies"]) <= policies
    # The calls between roles are allowed (--consul-intentions; ACLs deny by default).
    intentions = cluster.consul_get("/v1/connect/intentions", management)
    assert {(i["SourceName"], i["DestinationName"], i["Action"]) for i in intentions} == {
        ("cloudburst-scheduler", "cloudburst-executor", "allow"),
        ("cloudburst-scheduler", "cloudburst-kvs", "allow"),
        ("cloudburst-executor", "cloudburst-executor", "allow"),
        ("cloudburst-executor", "cloudburst-kvs", "allow"),
    }

    # The cbgrpc roles: config file where --config points, the env file the boot script writes.
    Path(inputs["paths"]["config_dir"]).mkdir(parents=True)
    if tls_mode == "consul":  # the tokens file the boot script fetches for the schedulers
        from cloudburst_grpc.security.tokens import hash_token, new_token

        cluster.client_token = new_token()
        tls_dir = Path(inputs["paths"]["config_dir"]) / "tls"
        tls_dir.mkdir()
        (tls_dir / "tokens").write_text(f"admin {hash_token(cluster.client_token)}\n")
    for role in ("kvs", "executor", "scheduler"):
        out = loopback[role]
        Path(out["config_path"]).write_text(out["cbgrpc_config"])
        role_env = {
            **env,
            "CBGRPC_SERVER_ADVERTISE_HOST": "127.0.0.1",
            "CONSUL_HTTP_TOKEN": params[f"{PREFIX}/consul/token/{role}"],
        }
        if role == "kvs":  # what the boot script writes: the Valkey cluster's URL
            role_env["CBGRPC_KVS_VALKEY_URL"] = valkey_url
        argv = loopback_argv(exec_start(out["units"][f"cloudburst-{role}.service"]), role_env)
        process = cluster.start(argv, role_env, role, "listening on")
        if role == "kvs":  # it stores into the Valkey cluster, as --engine valkey says
            process.wait_for("KVS store started on the Valkey cluster")
    return cluster


def started_loopback(
    rendered: Rendered, valkey_url: str, tmp_path: Path, tls_mode: str
) -> Iterator[LoopbackCluster]:
    """The rendered cluster, started on ports free just before; again on others if one
    was taken in between. Every process is stopped afterwards."""
    started: list[LoopbackCluster] = []
    try:
        for attempt in range(3):
            try:
                cluster = start_loopback(
                    rendered, tmp_path / f"attempt-{attempt}", valkey_url, started, tls_mode
                )
                break
            except PortTaken:
                started[-1].stop()
                if attempt == 2:
                    raise
        yield cluster
    finally:
        for each in started:
            each.stop()


@pytest.fixture
def loopback_cluster(
    rendered: Rendered, valkey_cluster: ValkeyCluster, tmp_path: Path
) -> Iterator[LoopbackCluster]:
    """The rendered cluster without TLS (tls_mode = "none")."""
    yield from started_loopback(rendered, valkey_cluster.url, tmp_path, "none")


@pytest.fixture
def loopback_consul_cluster(
    rendered: Rendered, valkey_cluster: ValkeyCluster, tmp_path: Path
) -> Iterator[LoopbackCluster]:
    """The rendered cluster with certificates from Consul's CA (tls_mode = "consul")."""
    yield from started_loopback(rendered, valkey_cluster.url, tmp_path, "consul")


def wait_until_passing(cluster: LoopbackCluster, service: str, count: int = 1) -> None:
    """Wait (Consul blocking queries, anonymous token) until ``count`` instances pass."""
    deadline = time.monotonic() + 60
    index = "0"
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{service} never passed its health check in Consul"
        wait = max(1, int(min(remaining, 20)))
        with urllib.request.urlopen(
            f"http://{cluster.http}/v1/health/service/{service}"
            f"?passing=true&index={index}&wait={wait}s",
            timeout=wait + 10,
        ) as response:
            index = response.headers.get("X-Consul-Index", "0")
            if len(json.load(response)) >= count:
                return


@pytest.mark.timeout(300)
def test_rendered_roles_form_a_working_cluster(loopback_cluster: LoopbackCluster) -> None:
    """Consul from its rendered configuration and unit, its ACLs from the rendered script,
    then each cbgrpc role from its rendered command and config file with the token the
    script created for it, the KVS on a real Valkey cluster; a client then runs functions
    and stores a value through the scheduler."""
    cluster = loopback_cluster
    inputs = cluster.inputs
    scratch = cluster.scratch
    env = {**os.environ, "PATH": f"{scratch}:{os.environ['PATH']}"}
    metric_calls = scratch / "metric-calls.jsonl"

    scheduler_address = f"127.0.0.1:{inputs['ports']['scheduler']}"
    # Wait until the scheduler passes its check...
    wait_until_passing(cluster, "cloudburst-scheduler")
    # ...then what the load balancer's health check asks, without a token, answers 200.
    with urllib.request.urlopen(
        f"http://{cluster.http}/v1/agent/health/service/name/cloudburst-scheduler", timeout=10
    ) as response:
        assert response.status == 200

    # The executors' pool comes from Consul (the scheduler's token may read it); the
    # scheduler passes its own check before its watch has necessarily seen the executor.
    wait_for_pool(scheduler_address, lambda pool: len(pool.executors) > 0)
    with CloudburstConnection(scheduler_address) as cloud:
        square = cloud.register(lambda _, x: x * x, "square")
        assert square(7).get(timeout=60) == 49
        cloud.put_object("deploy-key", "stored")
        assert cloud.get_object("deploy-key") == "stored"

    # The executors' autoscaling metric: the rendered publisher reads the gauge and sends it.
    publish = cluster.loopback["executor"]["scripts"]["/usr/local/sbin/cloudburst-publish-metrics"]
    run_script(publish, scratch / "publish-metrics", env, timeout=60)
    calls = [json.loads(line) for line in metric_calls.read_text().splitlines()]
    assert len(calls) == 1, calls
    call = calls[0]
    assert call[call.index("--metric-name") + 1] == "ExecutorUtilization"
    assert call[call.index("--dimensions") + 1] == "AutoScalingGroupName=loopback-executor"
    assert 0.0 <= float(call[call.index("--value") + 1]) <= 1.0

    # A role's token may register only its own service.
    kvs_token = cluster.params[f"{PREFIX}/consul/token/kvs"]
    request = urllib.request.Request(
        f"http://{cluster.http}/v1/agent/service/register",
        data=json.dumps({"Name": "cloudburst-scheduler", "ID": "impostor", "Port": 1}).encode(),
        method="PUT",
        headers={"X-Consul-Token": kvs_token},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403


@pytest.mark.timeout(300)
def test_rendered_roles_form_a_working_cluster_on_consuls_ca(
    loopback_consul_cluster: LoopbackCluster,
) -> None:
    """tls_mode = "consul": each role has its certificate signed by the rendered Consul
    server's CA, found through its local agent (``servers:PORT``), with the token the ACL
    script made for it; a client that trusts Consul's roots and shows a token runs a
    function and stores a value through the scheduler."""
    cluster = loopback_consul_cluster
    server_config = json.loads(cluster.loopback["consul_server"]["consul_config"])
    assert server_config["ports"]["grpc"] == cluster.inputs["consul_ports"]["grpc"]
    for role in CBGRPC_ROLES:
        assert "--insecure" not in cluster.loopback[role]["command"]
    wait_until_passing(cluster, "cloudburst-executor")
    wait_until_passing(cluster, "cloudburst-kvs")
    wait_until_passing(cluster, "cloudburst-scheduler")

    roots = cluster.consul_get("/v1/connect/ca/roots")
    ca = cluster.scratch / "consul-ca.pem"
    ca.write_text("".join(root["RootCert"].strip() + "\n" for root in roots["Roots"]))
    scheduler_address = f"127.0.0.1:{cluster.inputs['ports']['scheduler']}"
    login = ClientSecurity(
        ca_file=str(ca), token=cluster.client_token, server_name="scheduler.cloudburst.local"
    )
    # The scheduler passes its own check before its watch has necessarily seen the executor.
    wait_for_pool(scheduler_address, lambda pool: len(pool.executors) > 0, security=login)
    with CloudburstConnection(
        scheduler_address,
        tls_ca=login.ca_file,
        tls_server_name=login.server_name,
        token=login.token,
        timeout=30,
    ) as cloud:
        square = cloud.register(lambda _, x: x * x, "square")
        assert square(7).get(timeout=60) == 49
        cloud.put_object("deploy-key", "stored")
        assert cloud.get_object("deploy-key") == "stored"
