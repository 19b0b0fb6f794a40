# Runs the plan module for real (no provider): subnets, calls, rules and tags.

variables {
  cluster_name       = "demo"
  vpc_cidr           = "10.40.0.0/16"
  availability_zones = ["eu-west-1a", "eu-west-1b", "eu-west-1c"]
  client_cidrs       = ["203.0.113.0/24"]
  metrics_cidrs      = ["10.40.0.0/16"]
}

run "subnets_per_zone" {
  command = apply

  assert {
    condition     = output.private_subnet_cidrs == ["10.40.0.0/20", "10.40.16.0/20", "10.40.32.0/20"]
    error_message = "private subnets: ${jsonencode(output.private_subnet_cidrs)}"
  }
  assert {
    condition     = output.public_subnet_cidrs == ["10.40.240.0/24", "10.40.241.0/24", "10.40.242.0/24"]
    error_message = "public subnets: ${jsonencode(output.public_subnet_cidrs)}"
  }
}

run "six_zones_in_a_small_vpc" {
  command = apply

  variables {
    vpc_cidr           = "10.9.0.0/20"
    availability_zones = ["a", "b", "c", "d", "e", "f"]
  }

  assert {
    # Private /24s take the first six sixteenths, public /28s the last sixteenth.
    condition     = output.private_subnet_cidrs == [for i in range(6) : "10.9.${i}.0/24"] && output.public_subnet_cidrs == [for i in range(6) : "10.9.15.${16 * i}/28"]
    error_message = "unexpected subnets: ${jsonencode([output.private_subnet_cidrs, output.public_subnet_cidrs])}"
  }
}

run "only_the_load_balancer_reaches_the_schedulers_port" {
  command = apply

  assert {
    condition     = toset([for r in output.group_rules : r.from if r.to == "scheduler" && r.port == 7600]) == toset(["nlb"])
    error_message = "callers of the scheduler port"
  }
  assert {
    condition     = toset([for r in output.group_rules : r.from if r.to == "executor" && r.port == 7601]) == toset(["scheduler", "executor"])
    error_message = "callers of the executor port"
  }
  assert {
    condition     = toset([for r in output.group_rules : r.from if r.to == "kvs" && r.port == 7602]) == toset(["scheduler", "executor"])
    error_message = "callers of the KVS port"
  }
  assert {
    condition     = toset([for r in output.group_rules : r.from if r.to == "valkey"]) == toset(["kvs"])
    error_message = "only the KVS may reach Valkey"
  }
  assert {
    condition     = toset([for r in output.group_rules : r.from if r.to == "consul_server" && r.port == 8300]) == toset(["consul_server", "scheduler", "executor", "kvs"])
    error_message = "every agent reaches the servers' RPC port"
  }
  assert {
    # Gossip is a full mesh over TCP and UDP between every pair of agents.
    condition     = length([for r in output.group_rules : r if r.port == 8301]) == 4 * 4 * 2
    error_message = "LAN gossip rules"
  }
  assert {
    condition     = [for r in output.cidr_ingress_rules : r.cidr if r.to == "nlb"] == ["203.0.113.0/24"]
    error_message = "clients reach the load balancer"
  }
  assert {
    condition     = toset([for r in output.cidr_ingress_rules : r.to if r.port == 9464]) == toset(["scheduler", "executor", "kvs"])
    error_message = "metrics are scraped from every cbgrpc role"
  }
  assert {
    condition     = !anytrue([for r in output.group_rules : r.port == 8500 && r.to != "scheduler"])
    error_message = "Consul's HTTP API is reachable only on the schedulers, for the load balancer's health check"
  }
}

run "no_consul_grpc_rules_by_default" {
  command = apply

  assert {
    condition     = length([for r in output.group_rules : r if r.port == 8502]) == 0
    error_message = "Consul's gRPC port is open only for tls_mode = \"consul\""
  }
}

run "service_roles_reach_the_servers_grpc_with_tls_from_consul" {
  command = apply

  variables {
    tls_mode = "consul"
  }

  assert {
    condition     = toset([for r in output.group_rules : r.from if r.to == "consul_server" && r.port == 8502 && r.protocol == "tcp"]) == toset(["scheduler", "executor", "kvs"])
    error_message = "the service roles reach the servers' gRPC port"
  }
  assert {
    condition     = length([for r in output.group_rules : r if r.port == 8502]) == 3
    error_message = "nothing else reaches Consul's gRPC port"
  }
}

run "no_metrics_rules_by_default" {
  command = apply

  variables {
    metrics_cidrs = []
  }

  assert {
    condition     = length([for r in output.cidr_ingress_rules : r if r.port == 9464]) == 0
    error_message = "metrics open without metrics_cidrs"
  }
}

run "join_tag_on_every_role" {
  command = apply

  assert {
    condition     = alltrue([for role, tags in output.role_tags : tags["cloudburst:consul-join"] == "demo" && tags["cloudburst:cluster"] == "demo"])
    error_message = "every role carries the auto-join tag"
  }
  assert {
    condition     = output.role_tags["consul_server"]["Name"] == "demo-consul-server" && output.role_tags["kvs"]["cloudburst:role"] == "kvs"
    error_message = "role names and tags"
  }
}

run "ports_must_be_distinct" {
  command = plan

  variables {
    ports = { scheduler = 7600, executor = 7600, kvs = 7602, metrics = 9464 }
  }

  expect_failures = [var.ports]
}

run "one_zone_is_refused" {
  command = plan

  variables {
    availability_zones = ["eu-west-1a"]
  }

  expect_failures = [var.availability_zones]
}

run "consul_ports_are_refused" {
  command = plan

  variables {
    ports = { scheduler = 8500, executor = 7601, kvs = 7602, metrics = 9464 }
  }

  expect_failures = [var.ports]
}

run "a_name_too_long_for_the_load_balancer_is_refused" {
  command = plan

  variables {
    cluster_name = "abcdefghijklmnopqrstuvwxyz0"
  }

  expect_failures = [var.cluster_name]
}
