"""Invariants across deploy/terraform's files, checked by parsing the HCL (python-hcl2).

These are the facts no single module can check about itself: the load balancer listens on
the port the schedulers serve; every call between roles opens the callee's ingress and the
caller's egress; every role runs in its own security group; instances require IMDSv2 and
encrypt their volumes; the health check names the service the scheduler registers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hcl2
import pytest

from cloudburst.transport import SCHEDULER_SERVICE
from cloudburst_grpc.discovery.consul import EXECUTOR_SERVICE, KVS_SERVICE
from terraform_harness import MODULES, TERRAFORM

EXAMPLE = TERRAFORM / "examples" / "aws-cluster"
TF_FILES = sorted(TERRAFORM.rglob("*.tf"))


def unquote(value: Any) -> Any:
    """python-hcl2 keeps string literals and block labels quoted; drop that and its markers."""
    if isinstance(value, dict):
        return {
            unquote(k): unquote(v)
            for k, v in value.items()
            if k not in ("__is_block__", "__comments__", "__inline_comments__")
        }
    if isinstance(value, list):
        return [unquote(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def load(path: Path) -> dict[str, Any]:
    with path.open() as f:
        parsed: dict[str, Any] = unquote(hcl2.load(f))
    return parsed


def load_dir(directory: Path) -> dict[str, Any]:
    """All .tf files of a module, their top-level lists concatenated."""
    merged: dict[str, list[Any]] = {}
    for path in sorted(directory.glob("*.tf")):
        for kind, items in load(path).items():
            merged.setdefault(kind, []).extend(items)
    return merged


def resources(doc: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    """Resources of one type by name."""
    found: dict[str, dict[str, Any]] = {}
    for item in doc.get("resource", []):
        for name, body in item.get(kind, {}).items():
            found[name] = body
    return found


def modules(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: body for item in doc.get("module", []) for name, body in item.items()}


def locals_of(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for block in doc.get("locals", []) for k, v in block.items()}


def test_the_load_balancer_listens_on_the_schedulers_port_and_passes_tls_through() -> None:
    lb = load_dir(MODULES / "load-balancer")
    listener = resources(lb, "aws_lb_listener")["this"]
    target = resources(lb, "aws_lb_target_group")["this"]
    assert listener["port"] == target["port"] == "${var.port}"
    assert listener["protocol"] == target["protocol"] == "TCP"  # TCP: TLS passes through
    assert resources(lb, "aws_lb")["this"]["load_balancer_type"] == "network"

    root = modules(load_dir(EXAMPLE))
    # The same variable feeds the listener, the schedulers' config and their security group.
    assert root["load_balancer"]["port"] == "${var.ports.scheduler}"
    assert root["render"]["ports"] == "${var.ports}"
    assert root["plan"]["ports"] == "${var.ports}"
    assert root["load_balancer"]["security_group_ids"] == [
        '${module.network.security_group_ids["nlb"]}'
    ]


def test_the_health_check_asks_consul_for_the_service_the_scheduler_registers() -> None:
    root = modules(load_dir(EXAMPLE))
    check = root["load_balancer"]["health_check"]
    assert check["path"] == f"/v1/agent/health/service/name/{SCHEDULER_SERVICE}"
    assert check["port"] == "${module.plan.consul_ports.http}"
    # The plan opens exactly that port from the balancer to the schedulers.
    plan = load_dir(MODULES / "plan")
    calls = locals_of(plan)["calls"]
    assert "local.consul_ports.http" in calls and 'to = "scheduler"' in calls


def test_the_render_module_names_the_services_the_code_registers() -> None:
    names = locals_of(load_dir(MODULES / "render"))["service_names"]
    assert names == {
        "scheduler": SCHEDULER_SERVICE,
        "executor": EXECUTOR_SERVICE,
        "kvs": KVS_SERVICE,
    }


def test_every_call_opens_the_callees_ingress_and_the_callers_egress() -> None:
    network = load_dir(MODULES / "network")
    ingress = resources(network, "aws_vpc_security_group_ingress_rule")["from_group"]
    egress = resources(network, "aws_vpc_security_group_egress_rule")["to_group"]
    assert ingress["for_each"] == egress["for_each"] == "${var.group_rules}"
    assert ingress["security_group_id"] == "${aws_security_group.this[each.value.to].id}"
    assert (
        ingress["referenced_security_group_id"] == "${aws_security_group.this[each.value.from].id}"
    )
    assert egress["security_group_id"] == "${aws_security_group.this[each.value.from].id}"
    assert egress["referenced_security_group_id"] == "${aws_security_group.this[each.value.to].id}"
    for rule in (ingress, egress):
        assert rule["from_port"] == rule["to_port"] == "${each.value.port}"  # one port, no range

    root = modules(load_dir(EXAMPLE))
    for name in ("security_groups", "group_rules", "cidr_ingress_rules", "internet_egress"):
        assert root["network"][name] == f"${{module.plan.{name}}}"


def test_each_role_runs_in_its_own_security_group_and_subnets_are_private() -> None:
    group = modules(load_dir(EXAMPLE))["group"]
    assert group["security_group_ids"] == ["${module.network.security_group_ids[each.key]}"]
    assert group["subnet_ids"] == "${module.network.private_subnet_ids}"
    assert group["tags"] == "${module.plan.role_tags[each.key]}"


def test_instances_require_imdsv2_and_encrypt_their_volumes() -> None:
    templates = resources(load_dir(MODULES / "instance-group"), "aws_launch_template")
    assert templates
    for template in templates.values():
        (metadata,) = template["metadata_options"]
        assert metadata["http_tokens"] == "required"
        for mapping in template["block_device_mappings"]:
            for ebs in mapping["ebs"]:
                assert ebs["encrypted"] is True


def test_autoscaling_groups_propagate_their_tags_to_instances() -> None:
    """Cloud auto-join finds the Consul servers by the tags on their instances."""
    groups = resources(load_dir(MODULES / "instance-group"), "aws_autoscaling_group")
    (group,) = groups.values()
    (tag,) = group["dynamic"]
    assert tag["tag"]["for_each"] == "${var.tags}"
    assert tag["tag"]["content"][0]["propagate_at_launch"] is True


def test_valkey_is_clustered_replicated_and_encrypted() -> None:
    (group,) = resources(load_dir(MODULES / "valkey"), "aws_elasticache_replication_group").values()
    assert group["engine"] == "valkey"
    assert group["cluster_mode"] == "enabled"
    assert group["automatic_failover_enabled"] is True and group["multi_az_enabled"] is True
    assert group["transit_encryption_enabled"] is True
    assert group["at_rest_encryption_enabled"] is True
    assert group["auth_token"] == "${var.auth_token}"
    assert group["port"] == "${var.port}"
    # Only the KVS may reach it.
    root = modules(load_dir(EXAMPLE))
    assert root["valkey"]["security_group_ids"] == [
        '${module.network.security_group_ids["valkey"]}'
    ]


@pytest.mark.parametrize("path", TF_FILES, ids=lambda p: str(p.relative_to(TERRAFORM)))
def test_every_variable_and_output_is_documented_and_typed(path: Path) -> None:
    doc = load(path)
    for block in doc.get("variable", []):
        for name, body in block.items():
            assert body.get("description"), f"variable {name} in {path.name} has no description"
            assert "type" in body, f"variable {name} in {path.name} has no type"
    for block in doc.get("output", []):
        for name, body in block.items():
            assert body.get("description"), f"output {name} in {path.name} has no description"


def test_secrets_are_sensitive_variables() -> None:
    variables = {
        name: body
        for block in load(EXAMPLE / "variables.tf").get("variable", [])
        for name, body in block.items()
    }
    for name in ("consul_gossip_key", "consul_management_token", "valkey_auth_token"):
        assert variables[name].get("sensitive") is True, name


def test_executors_publish_the_metric_their_group_scales_on() -> None:
    """The publisher's metric and dimension are the ones the group's target tracking reads."""
    doc = load_dir(EXAMPLE)
    root = modules(doc)
    metric = locals_of(doc)["scaling_metric"]
    assert metric == {"namespace": "Cloudburst", "metric_name": "ExecutorUtilization"}
    # The publisher sends local.scaling_metric with the executors' group name...
    assert root["render"]["metrics"] == (
        '${merge(local.scaling_metric, {autoscaling_group = "${var.cluster_name}-executor"})}'
    )
    # ...which is the name the instance-group module gives the executors' group...
    assert root["group"]["name"] == '${var.cluster_name}-${replace(each.key, "_", "-")}'
    group = resources(load_dir(MODULES / "instance-group"), "aws_autoscaling_group")["this"]
    assert group["name"] == "${var.name}"
    # ...and the group tracks that same metric, dimensioned by its own name.
    assert "merge(local.scaling_metric" in root["group"]["target_tracking"]
    (policy,) = resources(load_dir(MODULES / "instance-group"), "aws_autoscaling_policy").values()
    (tracking,) = policy["target_tracking_configuration"]
    (custom,) = tracking["customized_metric_specification"]
    assert custom["namespace"] == "${var.target_tracking.namespace}"
    assert custom["metric_name"] == "${var.target_tracking.metric_name}"
    (dimension,) = custom["metric_dimension"]
    assert dimension["name"] == "AutoScalingGroupName"
    assert dimension["value"] == "${aws_autoscaling_group.this.name}"
