# Runs the render module for real (no provider) for each role and checks what it writes.

variables {
  cluster_name     = "demo"
  region           = "eu-west-1"
  parameter_prefix = "/cloudburst/demo"
  consul = {
    join_tag = { key = "cloudburst:consul-join", value = "demo" }
  }
  ports = { scheduler = 7600, executor = 7601, kvs = 7602, metrics = 9464 }
}

run "consul_server" {
  command = apply

  variables {
    role = "consul_server"
  }

  assert {
    condition     = jsondecode(output.consul_config).server == true && jsondecode(output.consul_config).bootstrap_expect == 3
    error_message = "a server expecting three servers"
  }
  assert {
    condition     = jsondecode(output.consul_config).retry_join == ["provider=aws region=eu-west-1 tag_key=cloudburst:consul-join tag_value=demo"]
    error_message = "cloud auto-join on the EC2 tag: ${output.consul_config}"
  }
  assert {
    condition     = jsondecode(output.consul_config).connect.enabled && jsondecode(output.consul_config).acl.enabled && jsondecode(output.consul_config).acl.default_policy == "deny"
    error_message = "service-mesh CA and deny-by-default ACLs"
  }
  assert {
    condition     = jsondecode(output.consul_config).encrypt_verify_incoming && jsondecode(output.consul_config).encrypt_verify_outgoing
    error_message = "gossip encryption enforced both ways"
  }
  assert {
    condition     = !can(jsondecode(output.consul_config).encrypt) && !can(jsondecode(output.consul_config).acl.tokens)
    error_message = "no secret in the rendered configuration (the boot script fetches them)"
  }
  assert {
    condition     = length(output.command) == 0 && output.cbgrpc_config == ""
    error_message = "a Consul server runs no cbgrpc role"
  }
  assert {
    condition     = keys(output.units) == ["cloudburst-bootstrap.service", "consul-acl-init.service", "consul.service"]
    error_message = "units: ${jsonencode(keys(output.units))}"
  }
  assert {
    condition     = strcontains(output.scripts["/usr/local/sbin/consul-acl-init"], "ensure_token '${output.token_accessors["kvs"]}' \"$(param consul/token/kvs)\" 'cloudburst-kvs'")
    error_message = "the servers create the KVS role's token"
  }
  assert {
    condition     = strcontains(output.scripts["/usr/local/sbin/consul-acl-init"], "ensure_intention 'cloudburst-scheduler' 'cloudburst-executor'\nensure_intention 'cloudburst-scheduler' 'cloudburst-kvs'\nensure_intention 'cloudburst-executor' 'cloudburst-executor'\nensure_intention 'cloudburst-executor' 'cloudburst-kvs'\n")
    error_message = "the servers allow the calls between roles (ACLs deny by default): ${output.scripts["/usr/local/sbin/consul-acl-init"]}"
  }
  assert {
    condition     = strcontains(output.acl_policies["cloudburst-scheduler"], "service \"cloudburst-scheduler\" {\n  policy = \"write\"")
    error_message = "the scheduler's token may register the scheduler service"
  }
  assert {
    condition     = startswith(output.user_data, "#cloud-config\n")
    error_message = "user data is a cloud-config"
  }
  assert {
    # EC2 takes at most 16 KiB of user data (before base64).
    condition     = length(output.user_data) < 16384
    error_message = "user data is ${length(output.user_data)} bytes"
  }
  assert {
    condition     = yamldecode(output.user_data).runcmd[2] == ["systemctl", "enable", "--now", "cloudburst-bootstrap.service", "consul.service", "consul-acl-init.service"]
    error_message = "first boot starts bootstrap, Consul, then the ACL set-up"
  }
}

run "scheduler" {
  command = apply

  variables {
    role = "scheduler"
  }

  assert {
    condition     = jsonencode(output.command) == jsonencode(["/opt/cloudburst-grpc/bin/cbgrpc", "scheduler", "--config", "/etc/cloudburst-grpc/scheduler.toml", "--insecure"])
    error_message = "command: ${jsonencode(output.command)}"
  }
  assert {
    condition     = output.cbgrpc_config == "[consul]\naddress = \"127.0.0.1:8500\"\ncheck_interval_seconds = 2\n\n[scheduler]\ncall_timeout_seconds = 300\ndirect_kvs = false\n\n[server]\ngrace_seconds = 10\nhost = \"0.0.0.0\"\nmetrics_port = 9464\nport = 7600\n"
    error_message = "config: ${output.cbgrpc_config}"
  }
  assert {
    condition     = jsondecode(output.consul_config).server == false && jsondecode(output.consul_config).addresses.http == "127.0.0.1 {{ GetPrivateIP }}"
    error_message = "the schedulers' agent answers the load balancer's health check on the private address"
  }
  assert {
    condition     = strcontains(output.units["cloudburst-scheduler.service"], "ExecStart=/opt/cloudburst-grpc/bin/cbgrpc scheduler --config /etc/cloudburst-grpc/scheduler.toml --insecure\n")
    error_message = "the unit runs the command"
  }
  assert {
    condition     = !strcontains(output.units["cloudburst-scheduler.service"], "OTEL_")
    error_message = "no OpenTelemetry export unless an endpoint is set"
  }
  assert {
    condition     = contains([for f in yamldecode(output.user_data).write_files : f.path], "/etc/cloudburst-grpc/scheduler.toml")
    error_message = "the user data writes the config file"
  }
  assert {
    condition     = [for f in yamldecode(output.user_data).write_files : f.content if f.path == "/etc/cloudburst-grpc/scheduler.toml"][0] == output.cbgrpc_config
    error_message = "the written config file is the rendered one"
  }
}

run "executor_with_telemetry" {
  command = apply

  variables {
    role             = "executor"
    executor_threads = 4
    otel             = { endpoint = "http://otel-collector.internal:4317" }
    metrics          = { autoscaling_group = "demo-executor" }
  }

  assert {
    condition     = strcontains(output.units["cloudburst-executor.service"], "Environment=OTEL_EXPORTER_OTLP_ENDPOINT=http://otel-collector.internal:4317\nEnvironment=OTEL_EXPORTER_OTLP_PROTOCOL=grpc\nEnvironment=OTEL_SERVICE_NAME=cloudburst-executor\nEnvironment=OTEL_TRACES_EXPORTER=otlp\nExecStart=")
    error_message = "unit: ${output.units["cloudburst-executor.service"]}"
  }
  assert {
    condition     = strcontains(output.cbgrpc_config, "[executor]\nthreads = 4\n")
    error_message = "threads per executor"
  }
  assert {
    condition     = strcontains(output.scripts["/usr/local/sbin/cloudburst-publish-metrics"], "--dimensions 'AutoScalingGroupName=demo-executor'")
    error_message = "the utilization metric carries the executors' group"
  }
  assert {
    condition     = length(output.user_data) < 16384
    error_message = "user data is ${length(output.user_data)} bytes: EC2 takes at most 16 KiB"
  }
  assert {
    condition     = contains(keys(output.units), "cloudburst-publish-metrics.timer")
    error_message = "executors publish the scaling metric on a timer"
  }
}

run "kvs_on_valkey" {
  command = apply

  variables {
    role   = "kvs"
    valkey = { enabled = true, endpoint = "clustercfg.demo.abc123.euw1.cache.amazonaws.com" }
  }

  assert {
    condition     = jsonencode(output.command) == jsonencode(["/opt/cloudburst-grpc/bin/cbgrpc", "kvs", "--config", "/etc/cloudburst-grpc/kvs.toml", "--engine", "valkey", "--insecure"])
    error_message = "command: ${jsonencode(output.command)}"
  }
  assert {
    condition     = strcontains(output.scripts["/usr/local/sbin/cloudburst-bootstrap"], "CBGRPC_KVS_VALKEY_URL=rediss://:%s@%s:%s") && strcontains(output.scripts["/usr/local/sbin/cloudburst-bootstrap"], "'clustercfg.demo.abc123.euw1.cache.amazonaws.com' '6379'")
    error_message = "the boot script writes a TLS Valkey URL with the auth token"
  }
  assert {
    condition     = strcontains(output.scripts["/usr/local/sbin/cloudburst-bootstrap"], "$(param valkey/auth-token)") && !strcontains(output.cbgrpc_config, "valkey")
    error_message = "the auth token comes from Parameter Store, never from the rendered files"
  }
}

run "kvs_tls_and_wheel" {
  command = apply

  variables {
    role     = "kvs"
    tls_mode = "files"
    package  = { requirement = "cloudburst-grpc[consul,otlp]==0.1.0", wheel_s3_uri = "s3://demo-artifacts/cloudburst_grpc-0.1.0-py3-none-any.whl" }
  }

  assert {
    condition     = jsonencode(output.command) == jsonencode(["/opt/cloudburst-grpc/bin/cbgrpc", "kvs", "--config", "/etc/cloudburst-grpc/kvs.toml", "--tls-cert", "/etc/cloudburst-grpc/tls/kvs.pem", "--tls-key", "/etc/cloudburst-grpc/tls/kvs-key.pem", "--tls-ca", "/etc/cloudburst-grpc/tls/ca.pem", "--consul-intentions"])
    error_message = "command: ${jsonencode(output.command)}"
  }
  assert {
    condition     = strcontains(output.scripts["/usr/local/sbin/cloudburst-install"], "pip install --quiet \"$wheel[consul,otlp]\"")
    error_message = "install: ${output.scripts["/usr/local/sbin/cloudburst-install"]}"
  }
}

run "scheduler_with_tls_files_and_client_tokens" {
  command = apply

  variables {
    role     = "scheduler"
    tls_mode = "files"
  }

  assert {
    condition     = jsonencode(slice(output.command, 4, length(output.command))) == jsonencode(["--tls-cert", "/etc/cloudburst-grpc/tls/scheduler.pem", "--tls-key", "/etc/cloudburst-grpc/tls/scheduler-key.pem", "--tls-ca", "/etc/cloudburst-grpc/tls/ca.pem", "--consul-intentions", "--tokens-file", "/etc/cloudburst-grpc/tls/tokens"])
    error_message = "command: ${jsonencode(output.command)}"
  }
  assert {
    condition     = strcontains(output.scripts["/usr/local/sbin/cloudburst-bootstrap"], "for name in ca.pem scheduler.pem scheduler-key.pem tokens; do")
    error_message = "the boot script fetches the scheduler's certificate, key, CA and tokens"
  }
}

run "consul_server_serves_the_ca_on_grpc_with_tls_from_consul" {
  command = apply

  variables {
    role     = "consul_server"
    tls_mode = "consul"
  }

  assert {
    condition     = jsondecode(output.consul_config).ports.grpc == 8502 && jsondecode(output.consul_config).connect.enabled
    error_message = "the servers serve the Connect CA's Sign on gRPC port 8502: ${output.consul_config}"
  }
  assert {
    condition     = strcontains(output.acl_policies["cloudburst-executor"], "service \"cloudburst-executor\" {\n  policy = \"write\"") && strcontains(output.acl_policies["cloudburst-executor"], "node_prefix \"\" {\n  policy = \"read\"")
    error_message = "each role's token may have its own service signed (service:write) and read the datacenter"
  }
}

run "consul_server_has_no_grpc_otherwise" {
  command = apply

  variables {
    role     = "consul_server"
    tls_mode = "files"
  }

  assert {
    condition     = jsondecode(output.consul_config).ports.grpc == -1
    error_message = "gRPC is off unless the services take certificates from Consul"
  }
}

run "executor_with_tls_from_consul" {
  command = apply

  variables {
    role     = "executor"
    tls_mode = "consul"
  }

  assert {
    condition     = jsonencode(slice(output.command, 4, length(output.command))) == jsonencode(["--consul-intentions"])
    error_message = "command: ${jsonencode(output.command)}"
  }
  assert {
    condition     = strcontains(output.cbgrpc_config, "[security]\nconsul_grpc_address = \"servers:8502\"\ntls_source = \"consul\"\n")
    error_message = "certificates from Consul's CA, signed by a server the agent names: ${output.cbgrpc_config}"
  }
  assert {
    condition     = jsondecode(output.consul_config).ports.grpc == -1
    error_message = "a client agent serves no gRPC"
  }
  assert {
    condition     = !strcontains(output.scripts["/usr/local/sbin/cloudburst-bootstrap"], "tls/")
    error_message = "no TLS files are fetched"
  }
}

run "scheduler_with_tls_from_consul_and_client_tokens" {
  command = apply

  variables {
    role     = "scheduler"
    tls_mode = "consul"
    consul = {
      join_tag = { key = "cloudburst:consul-join", value = "demo" }
      ports    = { grpc = 9502 }
    }
  }

  assert {
    condition     = jsonencode(slice(output.command, 4, length(output.command))) == jsonencode(["--consul-intentions", "--tokens-file", "/etc/cloudburst-grpc/tls/tokens"])
    error_message = "command: ${jsonencode(output.command)}"
  }
  assert {
    condition     = strcontains(output.scripts["/usr/local/sbin/cloudburst-bootstrap"], "for name in tokens; do")
    error_message = "the boot script fetches only the client tokens"
  }
  assert {
    condition     = strcontains(output.cbgrpc_config, "consul_grpc_address = \"servers:9502\"")
    error_message = "the servers' gRPC port follows consul.ports.grpc: ${output.cbgrpc_config}"
  }
}

run "no_security_table_without_consul_tls" {
  command = apply

  variables {
    role     = "kvs"
    tls_mode = "files"
  }

  assert {
    condition     = !strcontains(output.cbgrpc_config, "[security]")
    error_message = "file certificates are named on the command line"
  }
}

run "unknown_tls_mode_is_refused" {
  command = plan

  variables {
    role     = "kvs"
    tls_mode = "spiffe"
  }

  expect_failures = [var.tls_mode]
}

run "even_server_count_is_refused" {
  command = plan

  variables {
    role = "consul_server"
    consul = {
      server_count = 4
      join_tag     = { key = "k", value = "v" }
    }
  }

  expect_failures = [var.consul]
}

run "unpinned_package_is_refused" {
  command = plan

  variables {
    role    = "executor"
    package = { requirement = "cloudburst-grpc>=0.1" }
  }

  expect_failures = [var.package]
}
