# The whole example against a mocked AWS provider (make terraform-e2e: needs the provider,
# which CI does not build). The real provider still validates arguments, so the mocks'
# computed values look like real ids and ARNs.

mock_provider "aws" {
  mock_data "aws_availability_zones" {
    defaults = { names = ["eu-west-1a", "eu-west-1b", "eu-west-1c"] }
  }
  mock_data "aws_ami" {
    defaults = { id = "ami-0123456789abcdef0" }
  }
  mock_data "aws_caller_identity" {
    defaults = { account_id = "123456789012" }
  }
  mock_data "aws_region" {
    defaults = { region = "eu-west-1", name = "eu-west-1" }
  }
  mock_data "aws_partition" {
    defaults = { partition = "aws" }
  }
  mock_data "aws_iam_policy_document" {
    defaults = { json = "{\"Version\":\"2012-10-17\",\"Statement\":[{\"Effect\":\"Allow\",\"Action\":\"sts:AssumeRole\",\"Principal\":{\"Service\":\"ec2.amazonaws.com\"}}]}" }
  }
  mock_resource "aws_kms_key" {
    defaults = {
      arn    = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
      key_id = "1234abcd-12ab-34cd-56ef-1234567890ab"
    }
  }
  mock_resource "aws_ssm_parameter" {
    defaults = { arn = "arn:aws:ssm:eu-west-1:123456789012:parameter/cloudburst/test/secret" }
  }
  mock_resource "aws_vpc" {
    defaults = { id = "vpc-0123456789abcdef0", arn = "arn:aws:ec2:eu-west-1:123456789012:vpc/vpc-0123456789abcdef0" }
  }
  mock_resource "aws_subnet" {
    defaults = { id = "subnet-0123456789abcdef0" }
  }
  mock_resource "aws_security_group" {
    defaults = { id = "sg-0123456789abcdef0" }
  }
  mock_resource "aws_internet_gateway" {
    defaults = { id = "igw-0123456789abcdef0" }
  }
  mock_resource "aws_eip" {
    defaults = { id = "eipalloc-0123456789abcdef0" }
  }
  mock_resource "aws_nat_gateway" {
    defaults = { id = "nat-0123456789abcdef0" }
  }
  mock_resource "aws_route_table" {
    defaults = { id = "rtb-0123456789abcdef0" }
  }
  mock_resource "aws_cloudwatch_log_group" {
    defaults = { arn = "arn:aws:logs:eu-west-1:123456789012:log-group:/cloudburst/test" }
  }
  mock_resource "aws_iam_role" {
    defaults = { arn = "arn:aws:iam::123456789012:role/cloudburst-test", id = "cloudburst-test" }
  }
  mock_resource "aws_iam_instance_profile" {
    defaults = { arn = "arn:aws:iam::123456789012:instance-profile/cloudburst-test" }
  }
  mock_resource "aws_launch_template" {
    defaults = { id = "lt-0123456789abcdef0", latest_version = 1 }
  }
  mock_resource "aws_autoscaling_group" {
    defaults = { arn = "arn:aws:autoscaling:eu-west-1:123456789012:autoScalingGroup:1234abcd-12ab-34cd-56ef-1234567890ab:autoScalingGroupName/cloudburst-test" }
  }
  mock_resource "aws_lb" {
    defaults = {
      arn      = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:loadbalancer/net/cloudburst-sched/0123456789abcdef"
      dns_name = "cloudburst-sched-0123456789abcdef.elb.eu-west-1.amazonaws.com"
    }
  }
  mock_resource "aws_lb_target_group" {
    defaults = { arn = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/cloudburst-sched/0123456789abcdef" }
  }
  mock_resource "aws_elasticache_replication_group" {
    defaults = { configuration_endpoint_address = "clustercfg.cloudburst-kvs.abc123.euw1.cache.amazonaws.com" }
  }
  mock_resource "aws_s3_bucket" {
    defaults = { id = "cloudburst-artifacts-0123", arn = "arn:aws:s3:::cloudburst-artifacts-0123" }
  }
}

variables {
  cluster_name            = "cloudburst"
  client_cidrs            = ["203.0.113.0/24"]
  consul_gossip_key       = "MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTI="
  consul_management_token = "0b7e4c2a-1d3f-4a5b-8c6d-7e8f9a0b1c2d"
  valkey_auth_token       = "0123456789abcdef0123456789abcdef"
  client_tokens_file      = "tests/certs/tokens"
}

run "the_whole_cluster" {
  command = apply

  assert {
    condition     = output.scheduler_address == "cloudburst-sched-0123456789abcdef.elb.eu-west-1.amazonaws.com:7600"
    error_message = "scheduler_address: ${output.scheduler_address}"
  }
  assert {
    condition     = output.valkey_configuration_endpoint == "clustercfg.cloudburst-kvs.abc123.euw1.cache.amazonaws.com"
    error_message = "the KVS is pointed at the Valkey cluster"
  }
  assert {
    condition     = strcontains(module.render["kvs"].scripts["/usr/local/sbin/cloudburst-bootstrap"], "clustercfg.cloudburst-kvs.abc123.euw1.cache.amazonaws.com")
    error_message = "the KVS's boot script names the configuration endpoint"
  }
  assert {
    condition     = length(module.group) == 4 && output.autoscaling_groups["executor"] == "cloudburst-executor"
    error_message = "four groups: ${jsonencode(output.autoscaling_groups)}"
  }
  assert {
    condition     = length(aws_ssm_parameter.secret) == 7 + 1 && aws_ssm_parameter.secret["consul/management-token"].type == "SecureString"
    error_message = "seven secrets and the client tokens in Parameter Store"
  }
  assert {
    condition     = strcontains(module.render["executor"].cbgrpc_config, "tls_source = \"consul\"") && !strcontains(module.render["scheduler"].units["cloudburst-scheduler.service"], "--insecure")
    error_message = "by default the services take certificates from Consul's CA, and none runs --insecure"
  }
  assert {
    condition     = length(module.network.security_group_ids) == 6
    error_message = "one security group per role, the balancer and Valkey"
  }
}

run "without_valkey" {
  command = plan

  variables {
    valkey_enabled = false
  }

  assert {
    condition     = length(module.valkey) == 0 && output.valkey_configuration_endpoint == null
    error_message = "no Valkey cluster"
  }
  assert {
    condition     = length(aws_ssm_parameter.secret) == 6 + 1
    error_message = "no Valkey secret"
  }
}

run "an_even_number_of_consul_servers_is_refused" {
  command = plan

  variables {
    consul_servers = 4
  }

  expect_failures = [var.consul_servers]
}

run "tls_from_files" {
  command = plan

  variables {
    tls_mode           = "files"
    tls_certs_dir      = "tests/certs"
    client_tokens_file = "tests/certs/tokens"
  }

  assert {
    condition     = length(aws_ssm_parameter.secret) == 7 + 8
    error_message = "the CA, three certificates, three keys and the tokens file are stored"
  }
  assert {
    condition     = strcontains(module.render["scheduler"].units["cloudburst-scheduler.service"], "--tokens-file /etc/cloudburst-grpc/tls/tokens")
    error_message = "the schedulers read the client tokens"
  }
}

run "tls_from_files_needs_the_files" {
  command = plan

  variables {
    tls_mode           = "files"
    client_tokens_file = ""
  }

  expect_failures = [var.tls_certs_dir, var.client_tokens_file]
}

run "tls_from_consul" {
  command = plan

  variables {
    tls_mode           = "consul"
    client_tokens_file = "tests/certs/tokens"
  }

  assert {
    condition     = length(aws_ssm_parameter.secret) == 7 + 1
    error_message = "only the tokens file is stored besides the cluster's secrets"
  }
  assert {
    condition     = jsondecode(module.render["consul_server"].consul_config).ports.grpc == 8502
    error_message = "the servers serve the Connect CA on gRPC"
  }
  assert {
    condition     = strcontains(module.render["executor"].cbgrpc_config, "tls_source = \"consul\"") && strcontains(module.render["scheduler"].units["cloudburst-scheduler.service"], "--tokens-file /etc/cloudburst-grpc/tls/tokens")
    error_message = "the services take certificates from Consul; the schedulers read the client tokens"
  }
}

run "tls_from_consul_needs_the_client_tokens" {
  command = plan

  variables {
    client_tokens_file = ""
  }

  expect_failures = [var.client_tokens_file]
}

run "plain_grpc_inside_the_vpc" {
  command = plan

  variables {
    tls_mode           = "none"
    client_tokens_file = ""
  }

  assert {
    condition     = length(aws_ssm_parameter.secret) == 7
    error_message = "no certificate or token stored"
  }
  assert {
    condition     = strcontains(module.render["scheduler"].units["cloudburst-scheduler.service"], "--insecure")
    error_message = "a non-loopback bind without TLS says so"
  }
}
