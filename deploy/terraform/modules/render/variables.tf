variable "role" {
  description = "Which role's instance to render: consul_server, scheduler, executor or kvs."
  type        = string

  validation {
    condition     = contains(["consul_server", "scheduler", "executor", "kvs"], var.role)
    error_message = "role must be one of consul_server, scheduler, executor, kvs."
  }
}

variable "cluster_name" {
  description = "Name of the cluster (names the Consul datacenter's join tag value and the parameters)."
  type        = string
}

variable "region" {
  description = "AWS region (for cloud auto-join and the AWS CLI)."
  type        = string
}

variable "datacenter" {
  description = "Consul datacenter name."
  type        = string
  default     = "dc1"
}

variable "consul" {
  description = <<-EOT
    Consul agent settings. server_count: servers the cluster expects (odd). join_tag: the EC2
    tag cloud auto-join looks for. version: the Debian package version from HashiCorp's
    repository. retry_join: overrides cloud auto-join (tests on one machine use loopback).
    bind_addr: the address the agent binds (a go-sockaddr template by default).
  EOT
  type = object({
    server_count = optional(number, 3)
    join_tag     = object({ key = string, value = string })
    version      = optional(string, "1.22.3-1")
    retry_join   = optional(list(string))
    bind_addr    = optional(string, "{{ GetPrivateIP }}")
    ports = optional(object({
      server_rpc = optional(number, 8300)
      serf_lan   = optional(number, 8301)
      serf_wan   = optional(number, 8302)
      http       = optional(number, 8500)
      dns        = optional(number, 8600)
      grpc       = optional(number, 8502)
    }), {})
  })

  validation {
    condition     = var.consul.server_count >= 1 && var.consul.server_count % 2 == 1
    error_message = "consul.server_count must be odd (1, 3, 5, ...) so that a majority exists."
  }
}

variable "ports" {
  description = "gRPC ports of the roles and the metrics port (from the plan module)."
  type = object({
    scheduler = number
    executor  = number
    kvs       = number
    metrics   = number
  })
}

variable "bind_host" {
  description = "Address the cbgrpc process binds; 0.0.0.0 on AWS (security groups filter)."
  type        = string
  default     = "0.0.0.0"
}

variable "package" {
  description = <<-EOT
    What to install: requirement is a pip requirement pinned to one version; wheel_s3_uri, when
    set, is an s3:// URI of a wheel (uploaded by the example root) installed with the
    requirement's extras instead.
  EOT
  type = object({
    requirement  = optional(string, "cloudburst-grpc[consul,otlp]==0.1.0")
    wheel_s3_uri = optional(string, "")
  })
  default = {}

  validation {
    condition     = can(regex("^[A-Za-z0-9_.-]+(\\[[A-Za-z0-9_,.-]+\\])?==[A-Za-z0-9_.+!-]+$", var.package.requirement))
    error_message = "package.requirement must pin one version, e.g. cloudburst-grpc[consul,otlp]==0.1.0."
  }

  validation {
    condition     = var.package.wheel_s3_uri == "" || can(regex("^s3://[^/]+/.+\\.whl$", var.package.wheel_s3_uri))
    error_message = "package.wheel_s3_uri must be empty or an s3:// URI ending in .whl."
  }
}

variable "parameter_prefix" {
  description = "SSM Parameter Store path under which the cluster's secrets live, e.g. /cloudburst/prod."
  type        = string

  validation {
    condition     = can(regex("^(/[A-Za-z0-9_.-]+)+$", var.parameter_prefix))
    error_message = "parameter_prefix must be a path like /cloudburst/prod."
  }
}

variable "valkey" {
  description = "The Valkey cluster the KVS role uses: its configuration endpoint and port (kvs role only)."
  type = object({
    enabled  = bool
    endpoint = optional(string, "")
    port     = optional(number, 6379)
  })
  default = { enabled = false }
}

variable "tls_mode" {
  description = <<-EOT
    Security of the cbgrpc services: "files" (mutual TLS with the certificates `cbgrpc certs`
    makes, fetched from Parameter Store at boot; client tokens on the schedulers; Consul
    intentions decide which roles may call which), "consul" (the same, with each service's
    certificate signed by Consul's service-mesh CA through a Consul server's gRPC API; only the
    schedulers' client tokens come from Parameter Store) or "none" (plain gRPC inside the VPC,
    which a non-loopback bind must acknowledge with --insecure).
  EOT
  type        = string
  default     = "none"

  validation {
    condition     = contains(["none", "files", "consul"], var.tls_mode)
    error_message = "tls_mode must be \"none\", \"files\" or \"consul\"."
  }
}

variable "otel" {
  description = "OpenTelemetry: OTLP endpoint for traces (empty: off) and its protocol."
  type = object({
    endpoint = optional(string, "")
    protocol = optional(string, "grpc")
  })
  default = {}
}

variable "metrics" {
  description = "Publish executor utilization to CloudWatch (namespace, metric name, ASG dimension) every interval."
  type = object({
    namespace         = optional(string, "Cloudburst")
    metric_name       = optional(string, "ExecutorUtilization")
    autoscaling_group = optional(string, "")
    interval_seconds  = optional(number, 60)
  })
  default = {}
}

variable "executor_threads" {
  description = "Threads per executor for user code."
  type        = number
  default     = 8
}

variable "call_timeout_seconds" {
  description = "Longest a call may run, in seconds (schedulers and executors)."
  type        = number
  default     = 300
}

variable "extra_args" {
  description = "Extra flags appended to the role's cbgrpc command line."
  type        = list(string)
  default     = []
}

variable "paths" {
  description = "Where things live on the instance (tests on one machine point these elsewhere)."
  type = object({
    venv              = optional(string, "/opt/cloudburst-grpc")
    config_dir        = optional(string, "/etc/cloudburst-grpc")
    consul_bin        = optional(string, "/usr/bin/consul")
    consul_config_dir = optional(string, "/etc/consul.d")
    consul_data_dir   = optional(string, "/opt/consul")
  })
  default = {}
}
