# Everything one instance of one role needs, rendered without a provider: the Consul agent's
# configuration, the cbgrpc config file and command line, the systemd units, the boot scripts,
# and the cloud-init user data that writes them all. `tofu test` checks it; the Python tests
# feed the artefacts to `consul validate`, `cloud-init schema` and `systemd-analyze verify`,
# and start them on loopback.

locals {
  is_server = var.role == "consul_server"
  # Consul service names (cloudburst_grpc/discovery/consul.py).
  service_names = {
    scheduler = "cloudburst-scheduler"
    executor  = "cloudburst-executor"
    kvs       = "cloudburst-kvs"
  }
  cbgrpc_bin = "${var.paths.venv}/bin/cbgrpc"

  consul_ports = {
    server_rpc = var.consul.ports.server_rpc
    serf_lan   = var.consul.ports.serf_lan
    serf_wan   = var.consul.ports.serf_wan
    http       = var.consul.ports.http
    dns        = var.consul.ports.dns
    grpc       = var.consul.ports.grpc
  }
  retry_join = var.consul.retry_join != null ? var.consul.retry_join : [
    "provider=aws region=${var.region} tag_key=${var.consul.join_tag.key} tag_value=${var.consul.join_tag.value}"
  ]

  # Consul agent configuration. Secrets (gossip key, ACL tokens) are not in it: the boot
  # script fetches them from SSM Parameter Store into secrets.json beside it.
  consul_config = merge(
    {
      datacenter  = var.datacenter
      data_dir    = var.paths.consul_data_dir
      server      = local.is_server
      bind_addr   = var.consul.bind_addr
      client_addr = "127.0.0.1"
      retry_join  = local.retry_join
      log_level   = "INFO"
      ports = {
        server   = local.consul_ports.server_rpc
        serf_lan = local.consul_ports.serf_lan
        serf_wan = local.consul_ports.serf_wan
        http     = local.consul_ports.http
        dns      = local.consul_ports.dns
        # Consul servers serve the CA's Sign on gRPC (plaintext) with tls_mode = "consul".
        grpc = local.is_server && var.tls_mode == "consul" ? local.consul_ports.grpc : -1
      }
      encrypt_verify_incoming = true
      encrypt_verify_outgoing = true
      acl = {
        enabled                  = true
        default_policy           = "deny"
        down_policy              = "extend-cache"
        enable_token_persistence = true
      }
      leave_on_terminate = !local.is_server
    },
    # (`{ for ... if }` keeps both branches' types apart, which `cond ? {...} : {}` cannot.)
    { for k, v in {
      bootstrap_expect = var.consul.server_count
      ui_config        = { enabled = true }
      # The service-mesh CA (built-in provider): services get leaf certificates from it.
      connect   = { enabled = true }
      autopilot = { cleanup_dead_servers = true }
    } : k => v if local.is_server },
    # The load balancer asks the schedulers' agent for the grpc.health.v1 check it runs
    # (NLB target groups cannot speak gRPC health themselves).
    { for k, v in {
      addresses = { http = "127.0.0.1 ${var.consul.bind_addr}" }
    } : k => v if var.role == "scheduler" },
  )

  # cbgrpc config file: only settings cloudburst_grpc/config.py accepts.
  server_section = {
    host          = var.bind_host
    port          = local.is_server ? 0 : var.ports[var.role]
    metrics_port  = var.ports.metrics
    grace_seconds = 10.0
  }
  consul_section = {
    address                = "127.0.0.1:${local.consul_ports.http}"
    check_interval_seconds = 2.0
  }
  role_sections = {
    # Clients come through the load balancer and cannot reach the KVS's private port: the
    # schedulers name no KVS address to them (clients would try it for two seconds each).
    scheduler     = { scheduler = { call_timeout_seconds = var.call_timeout_seconds, direct_kvs = false } }
    executor      = { executor = { threads = var.executor_threads } }
    kvs           = {}
    consul_server = {}
  }
  # tls_mode = "consul": certificates from Consul's CA, signed by whichever Consul server the
  # local agent names (the servers join by cloud auto-join: no fixed address).
  consul_tls = var.tls_mode == "consul" && !local.is_server
  security_section = {
    tls_source          = "consul"
    consul_grpc_address = "servers:${local.consul_ports.grpc}"
  }
  # No conditional here: it would unify the tables' types and quote every number.
  toml_tables = merge(
    { server = local.server_section, consul = local.consul_section },
    local.role_sections[var.role],
    { for k, v in { security = local.security_section } : k => v if local.consul_tls },
  )
  # TOML by hand (no tomlencode): tables of numbers and strings, strings JSON-quoted (valid TOML).
  cbgrpc_config = local.is_server ? "" : join("\n", [
    for table in sort(keys(local.toml_tables)) : join("\n", concat(
      ["[${table}]"],
      [for k in sort(keys(local.toml_tables[table])) : "${k} = ${jsonencode(local.toml_tables[table][k])}"],
      [""],
    ))
  ])
  config_path = local.is_server ? "" : "${var.paths.config_dir}/${var.role}.toml"

  # The command line. The KVS stores lattices in Valkey; --engine/--valkey-url are the KVS
  # engine's flags, and the URL (with its credentials) comes from the environment file.
  engine_args = var.role == "kvs" && var.valkey.enabled ? ["--engine", "valkey"] : []
  # Security flags: certificate files written by the boot script, or an explicit --insecure.
  tls_dir = "${var.paths.config_dir}/tls"
  tls_files = local.is_server || var.tls_mode == "none" ? [] : concat(
    var.tls_mode == "files" ? ["ca.pem", "${var.role}.pem", "${var.role}-key.pem"] : [],
    var.role == "scheduler" ? ["tokens"] : [],
  )
  tls_args = local.is_server ? [] : var.tls_mode == "none" ? ["--insecure"] : concat(
    var.tls_mode == "files" ? [
      "--tls-cert", "${local.tls_dir}/${var.role}.pem",
      "--tls-key", "${local.tls_dir}/${var.role}-key.pem",
      "--tls-ca", "${local.tls_dir}/ca.pem",
    ] : [],
    ["--consul-intentions"],
    var.role == "scheduler" ? ["--tokens-file", "${local.tls_dir}/tokens"] : [],
  )
  command = local.is_server ? [] : concat(
    [local.cbgrpc_bin, var.role, "--config", local.config_path],
    local.engine_args,
    local.tls_args,
    var.extra_args,
  )

  otel_environment = var.otel.endpoint == "" ? {} : {
    OTEL_EXPORTER_OTLP_ENDPOINT = var.otel.endpoint
    OTEL_EXPORTER_OTLP_PROTOCOL = var.otel.protocol
    OTEL_TRACES_EXPORTER        = "otlp"
    OTEL_SERVICE_NAME           = local.is_server ? "" : local.service_names[var.role]
  }

  otel_lines = join("", [for k in sort(keys(local.otel_environment)) : "Environment=${k}=${local.otel_environment[k]}\n"])

  units = merge(
    {
      "cloudburst-bootstrap.service" = <<-EOT
        [Unit]
        Description=Fetch this instance's address and the cluster's secrets
        Wants=network-online.target
        After=network-online.target
        Before=consul.service

        [Service]
        Type=oneshot
        RemainAfterExit=yes
        ExecStart=/usr/local/sbin/cloudburst-bootstrap

        [Install]
        WantedBy=multi-user.target
      EOT
      "consul.service"               = <<-EOT
        [Unit]
        Description=Consul agent (${local.is_server ? "server" : "client"})
        Documentation=https://developer.hashicorp.com/consul/docs
        Wants=network-online.target
        Requires=cloudburst-bootstrap.service
        After=network-online.target cloudburst-bootstrap.service
        ConditionFileNotEmpty=${var.paths.consul_config_dir}/consul.json

        [Service]
        Type=notify
        User=consul
        Group=consul
        ExecStart=${var.paths.consul_bin} agent -config-dir=${var.paths.consul_config_dir}
        ExecReload=/bin/kill --signal HUP $MAINPID
        KillMode=process
        KillSignal=SIGTERM
        Restart=on-failure
        RestartSec=2
        LimitNOFILE=65536

        [Install]
        WantedBy=multi-user.target
      EOT
    },
    local.is_server ? {
      "consul-acl-init.service" = <<-EOT
        [Unit]
        Description=Create the cluster's Consul ACL policies, tokens and intentions (idempotent)
        Requires=consul.service
        After=consul.service

        [Service]
        Type=oneshot
        RemainAfterExit=yes
        ExecStart=/usr/local/sbin/consul-acl-init
        Restart=on-failure
        RestartSec=10

        [Install]
        WantedBy=multi-user.target
      EOT
      } : {
      "cloudburst-${var.role}.service" = <<-EOT
        [Unit]
        Description=cloudburst-grpc ${var.role}
        Wants=network-online.target
        Requires=cloudburst-bootstrap.service
        After=network-online.target cloudburst-bootstrap.service consul.service

        [Service]
        Type=simple
        User=cloudburst
        Group=cloudburst
        EnvironmentFile=${var.paths.config_dir}/${var.role}.env
        ${local.otel_lines}ExecStart=${join(" ", local.command)}
        KillSignal=SIGTERM
        TimeoutStopSec=30
        Restart=on-failure
        RestartSec=2
        LimitNOFILE=65536
        NoNewPrivileges=yes
        PrivateTmp=yes
        ProtectSystem=strict
        ProtectHome=yes
        StateDirectory=cloudburst-grpc

        [Install]
        WantedBy=multi-user.target
      EOT
    },
    var.role == "executor" ? {
      "cloudburst-publish-metrics.service" = <<-EOT
        [Unit]
        Description=Publish executor utilization to CloudWatch (the autoscaling metric)
        After=cloudburst-executor.service

        [Service]
        Type=oneshot
        ExecStart=/usr/local/sbin/cloudburst-publish-metrics
      EOT
      "cloudburst-publish-metrics.timer"   = <<-EOT
        [Unit]
        Description=Publish executor utilization every ${var.metrics.interval_seconds} seconds

        [Timer]
        OnBootSec=${var.metrics.interval_seconds}
        OnUnitActiveSec=${var.metrics.interval_seconds}
        AccuracySec=1

        [Install]
        WantedBy=timers.target
      EOT
    } : {},
  )

  # ACL policies the servers create (rules in HCL files read with -rules @file).
  acl_policies = merge(
    {
      "cloudburst-agent"          = "node_prefix \"\" {\n  policy = \"write\"\n}\nservice_prefix \"\" {\n  policy = \"read\"\n}\n"
      "cloudburst-anonymous-read" = "node_prefix \"\" {\n  policy = \"read\"\n}\nservice_prefix \"\" {\n  policy = \"read\"\n}\n"
    },
    {
      for r, name in local.service_names : "cloudburst-${r}" => "service \"${name}\" {\n  policy = \"write\"\n}\nservice_prefix \"\" {\n  policy = \"read\"\n}\nnode_prefix \"\" {\n  policy = \"read\"\n}\n"
    },
  )
  # Intentions the servers create for the calls between roles (the plan module's security-group
  # rules): with ACLs denying by default, --consul-intentions refuses every other call. Each is
  # created once; an operator's later change to it stays.
  intentions = [
    ["scheduler", "executor"],
    ["scheduler", "kvs"],
    ["executor", "executor"],
    ["executor", "kvs"],
  ]
  # Token accessor ids are not secret: derive them so every server agrees without talking.
  token_accessors = {
    for r in concat(["agent"], keys(local.service_names)) : r => uuidv5("url", "cloudburst-grpc:${var.cluster_name}:${r}")
  }

  scripts = merge(
    {
      "/usr/local/sbin/cloudburst-bootstrap" = templatefile("${path.module}/templates/bootstrap.sh.tftpl", {
        region            = var.region
        prefix            = var.parameter_prefix
        role              = var.role
        is_server         = local.is_server
        consul_config_dir = var.paths.consul_config_dir
        config_dir        = var.paths.config_dir
        valkey            = var.role == "kvs" ? var.valkey : { enabled = false, endpoint = "", port = 0 }
        tls_dir           = local.tls_dir
        tls_files         = local.tls_files
      })
      "/usr/local/sbin/cloudburst-install" = templatefile("${path.module}/templates/install.sh.tftpl", {
        region       = var.region
        venv         = var.paths.venv
        requirement  = var.package.requirement
        wheel_s3_uri = var.package.wheel_s3_uri
        extras       = try(regex("\\[([^]]+)\\]", var.package.requirement)[0], "")
      })
    },
    local.is_server ? {
      "/usr/local/sbin/consul-acl-init" = templatefile("${path.module}/templates/acl-init.sh.tftpl", {
        region     = var.region
        prefix     = var.parameter_prefix
        http_port  = local.consul_ports.http
        consul_bin = var.paths.consul_bin
        policies   = keys(local.acl_policies)
        roles      = keys(local.service_names)
        accessors  = local.token_accessors
        policy_dir = "/etc/consul-acl"
        intentions = [for pair in local.intentions : [local.service_names[pair[0]], local.service_names[pair[1]]]]
      })
    } : {},
    var.role == "executor" ? {
      "/usr/local/sbin/cloudburst-publish-metrics" = templatefile("${path.module}/templates/publish-metrics.sh.tftpl", {
        region            = var.region
        metrics_port      = var.ports.metrics
        namespace         = var.metrics.namespace
        metric_name       = var.metrics.metric_name
        autoscaling_group = var.metrics.autoscaling_group
      })
    } : {},
  )

  write_files = concat(
    [
      for p in sort(keys(local.scripts)) : { path = p, permissions = "0755", owner = "root:root", content = local.scripts[p] }
    ],
    [
      for u in sort(keys(local.units)) : { path = "/etc/systemd/system/${u}", permissions = "0644", owner = "root:root", content = local.units[u] }
    ],
    [
      { path = "${var.paths.consul_config_dir}/consul.json", permissions = "0640", owner = "consul:consul", content = jsonencode(local.consul_config), defer = true },
    ],
    local.is_server ? [
      for name in sort(keys(local.acl_policies)) : { path = "/etc/consul-acl/${name}.hcl", permissions = "0644", owner = "root:root", content = local.acl_policies[name] }
      ] : [
      { path = local.config_path, permissions = "0644", owner = "root:root", content = local.cbgrpc_config },
    ],
  )

  # Units the first boot starts, in order (cloud-init runs after the network is up).
  start_units = concat(
    ["cloudburst-bootstrap.service", "consul.service"],
    local.is_server ? ["consul-acl-init.service"] : ["cloudburst-${var.role}.service"],
    var.role == "executor" ? ["cloudburst-publish-metrics.timer"] : [],
  )

  cloud_config = {
    package_update = true
    apt = {
      sources = {
        hashicorp = {
          source = "deb https://apt.releases.hashicorp.com $RELEASE main"
          # HashiCorp's package-signing key.
          keyid = "798AEC654E5C15428C8E42EEAA16FCBCA621E701"
        }
      }
    }
    packages = [
      "awscli",
      "ca-certificates",
      "curl",
      "python3-venv",
      ["consul", var.consul.version],
    ]
    users = concat(["default"], [
      for u in [{ name = "cloudburst", system = true, shell = "/usr/sbin/nologin", homedir = "/var/lib/cloudburst-grpc", no_create_home = true, lock_passwd = true }] : u if !local.is_server
    ])
    write_files = local.write_files
    runcmd = concat(
      [["/usr/local/sbin/cloudburst-install"], ["systemctl", "daemon-reload"]],
      [concat(["systemctl", "enable", "--now"], local.start_units)],
    )
  }
  user_data = "#cloud-config\n${yamlencode(local.cloud_config)}"
}
