# The cluster's plan, without a provider: subnet CIDRs, who calls whom on which port,
# the security-group rules that follow from it, and the tags of each role.
# Every AWS module takes its numbers from here, and `tofu test` checks them.

locals {
  # Private subnets: the first /20s of a /16 (one per zone, up to six). Public subnets,
  # for the load balancer and the NAT gateways only: /24s at the end of the block.
  private_subnet_cidrs = [for i, _ in var.availability_zones : cidrsubnet(var.vpc_cidr, 4, i)]
  public_subnet_cidrs  = [for i, _ in var.availability_zones : cidrsubnet(var.vpc_cidr, 8, 240 + i)]

  # Consul's ports (https://developer.hashicorp.com/consul/docs/install/ports): server RPC,
  # LAN gossip (TCP and UDP), WAN gossip between servers, the agent's HTTP API, and the
  # servers' gRPC API (tls_mode = "consul" only).
  consul_ports = {
    server_rpc = 8300
    serf_lan   = 8301
    serf_wan   = 8302
    http       = 8500
    grpc       = 8502
  }

  # Every instance runs a Consul agent: these roles are the gossip pool.
  agents = ["consul_server", "scheduler", "executor", "kvs"]

  # Who calls whom, by security group: caller -> list of { to, port, protocol, why }.
  # "nlb" is the schedulers' load balancer; "valkey" the ElastiCache cluster.
  calls = merge(
    {
      for a in local.agents : a => concat(
        [
          { to = "consul_server", port = local.consul_ports.server_rpc, protocol = "tcp", why = "Consul server RPC" },
        ],
        [
          for b in local.agents : { to = b, port = local.consul_ports.serf_lan, protocol = "tcp", why = "Consul LAN gossip" }
        ],
        [
          for b in local.agents : { to = b, port = local.consul_ports.serf_lan, protocol = "udp", why = "Consul LAN gossip" }
        ],
        a == "consul_server" ? [
          { to = "consul_server", port = local.consul_ports.serf_wan, protocol = "tcp", why = "Consul WAN gossip" },
          { to = "consul_server", port = local.consul_ports.serf_wan, protocol = "udp", why = "Consul WAN gossip" },
        ] : [],
        # tls_mode = "consul": the servers' Connect CA signs each service's certificate.
        var.tls_mode == "consul" && a != "consul_server" ? [
          { to = "consul_server", port = local.consul_ports.grpc, protocol = "tcp", why = "Consul CA signs service certificates (gRPC)" },
        ] : [],
        a == "scheduler" ? [
          { to = "executor", port = var.ports.executor, protocol = "tcp", why = "scheduler places calls on executors" },
          { to = "kvs", port = var.ports.kvs, protocol = "tcp", why = "scheduler forwards KVS calls" },
        ] : [],
        a == "executor" ? [
          { to = "executor", port = var.ports.executor, protocol = "tcp", why = "DAG triggers and messages between executors" },
          { to = "kvs", port = var.ports.kvs, protocol = "tcp", why = "executors read and write the KVS" },
        ] : [],
        a == "kvs" ? [
          { to = "valkey", port = var.valkey_port, protocol = "tcp", why = "the KVS stores lattices in Valkey" },
        ] : [],
      )
    },
    {
      nlb = [
        { to = "scheduler", port = var.ports.scheduler, protocol = "tcp", why = "clients' gRPC calls, TLS passed through" },
        { to = "scheduler", port = local.consul_ports.http, protocol = "tcp", why = "target health: the local Consul agent's view of grpc.health.v1" },
      ]
    },
  )

  # Security groups: one per role, one for the load balancer, one for Valkey.
  security_groups = concat(local.agents, ["nlb", "valkey"])

  # Rules between security groups, keyed uniquely (the key is stable across plans).
  group_rules = flatten([
    for from, list in local.calls : [
      for c in list : {
        key         = "${from}-${c.to}-${c.protocol}-${c.port}"
        from        = from
        to          = c.to
        port        = c.port
        protocol    = c.protocol
        description = c.why
      }
    ]
  ])

  # Rules from outside the cluster: clients to the load balancer, scrapers to metrics.
  cidr_ingress_rules = concat(
    [
      for cidr in var.client_cidrs : {
        key         = "nlb-${replace(cidr, "/", "_")}-${var.ports.scheduler}"
        to          = "nlb"
        cidr        = cidr
        port        = var.ports.scheduler
        protocol    = "tcp"
        description = "clients call the schedulers"
      }
    ],
    flatten([
      for role in ["scheduler", "executor", "kvs"] : [
        for cidr in var.metrics_cidrs : {
          key         = "${role}-${replace(cidr, "/", "_")}-${var.ports.metrics}"
          to          = role
          cidr        = cidr
          port        = var.ports.metrics
          protocol    = "tcp"
          description = "Prometheus scrapes the metrics endpoint"
        }
      ]
    ]),
  )

  # Egress to the outside: package installs, AWS APIs (SSM, EC2 DescribeInstances for
  # cloud auto-join, CloudWatch) over HTTPS, and Debian's mirrors over HTTP, through NAT.
  internet_egress = {
    for pair in setproduct(local.agents, [{ port = 443, why = "HTTPS to AWS APIs and package indexes" }, { port = 80, why = "Debian package mirrors" }]) :
    "${pair[0]}-${pair[1].port}" => { from = pair[0], port = pair[1].port, description = pair[1].why }
  }

  base_tags = merge(var.tags, { "cloudburst:cluster" = var.cluster_name })

  # Tags per role; "cloudburst:consul-join" is what cloud auto-join looks for.
  consul_join_tag = { key = "cloudburst:consul-join", value = var.cluster_name }
  role_tags = {
    for role in local.agents : role => merge(local.base_tags, {
      "Name"                      = "${var.cluster_name}-${replace(role, "_", "-")}"
      "cloudburst:role"           = replace(role, "_", "-")
      (local.consul_join_tag.key) = local.consul_join_tag.value
    })
  }
}
