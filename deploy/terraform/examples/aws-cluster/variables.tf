variable "region" {
  description = "AWS region."
  type        = string
  default     = "eu-west-1"
}

variable "cluster_name" {
  description = "Name of the cluster: 3-26 lower-case letters, digits and '-'."
  type        = string
  default     = "cloudburst"
}

variable "zone_count" {
  description = "Availability zones to use (at least two)."
  type        = number
  default     = 3
}

variable "vpc_cidr" {
  description = "CIDR block of the new VPC."
  type        = string
  default     = "10.40.0.0/16"
}

variable "existing_vpc" {
  description = "Deploy into this VPC and its subnets instead of creating one."
  type = object({
    vpc_id             = string
    private_subnet_ids = list(string)
    public_subnet_ids  = list(string)
  })
  default = null
}

variable "single_nat_gateway" {
  description = "One NAT gateway instead of one per zone (cheaper, but a zone's loss cuts egress)."
  type        = bool
  default     = false
}

variable "client_cidrs" {
  description = "Who may call the schedulers through the load balancer."
  type        = list(string)
}

variable "internal_load_balancer" {
  description = "Keep the schedulers' load balancer inside the VPC."
  type        = bool
  default     = false
}

variable "metrics_cidrs" {
  description = "Who may scrape the Prometheus metrics port of every cbgrpc process (inside the VPC)."
  type        = list(string)
  default     = []
}

variable "ports" {
  description = "gRPC ports of the roles and the metrics port."
  type = object({
    scheduler = number
    executor  = number
    kvs       = number
    metrics   = number
  })
  default = {
    scheduler = 7600
    executor  = 7601
    kvs       = 7602
    metrics   = 9464
  }
}

variable "ami_id" {
  description = "AMI of every instance; null picks the latest Debian 12 (amd64) from Debian's account."
  type        = string
  default     = null
}

variable "instance_types" {
  description = "EC2 instance type of each role."
  type = object({
    consul_server = optional(string, "t3.small")
    scheduler     = optional(string, "c7i.large")
    executor      = optional(string, "c7i.xlarge")
    kvs           = optional(string, "c7i.large")
  })
  default = {}
}

variable "consul_servers" {
  description = "Number of Consul servers (odd)."
  type        = number
  default     = 3

  validation {
    condition     = var.consul_servers >= 1 && var.consul_servers % 2 == 1
    error_message = "consul_servers must be odd (1, 3, 5, ...) so that a majority exists."
  }
}

variable "schedulers" {
  description = "Size range of the schedulers' group."
  type        = object({ min = number, max = number })
  default     = { min = 2, max = 4 }
}

variable "executors" {
  description = "Size range of the executors' group (it scales between them)."
  type        = object({ min = number, max = number })
  default     = { min = 2, max = 10 }
}

variable "executor_target_utilization" {
  description = "Share of executor threads busy (cloudburst.executor.utilization) the executors' group keeps."
  type        = number
  default     = 0.6

  validation {
    condition     = var.executor_target_utilization > 0 && var.executor_target_utilization < 1
    error_message = "executor_target_utilization must be between 0 and 1."
  }
}

variable "executor_threads" {
  description = "Threads per executor for user code."
  type        = number
  default     = 8
}

variable "kvs_processes" {
  description = "Size range of the KVS processes' group (stateless over Valkey)."
  type        = object({ min = number, max = number })
  default     = { min = 2, max = 4 }
}

variable "package_requirement" {
  description = "The project to install, pinned: a pip requirement with one version."
  type        = string
  default     = "cloudburst-grpc[consul,otlp]==0.1.0"
}

variable "wheel_path" {
  description = "A local wheel of the project to upload and install instead of the package index (empty: none)."
  type        = string
  default     = ""
}

variable "consul_version" {
  description = "Consul's Debian package version (HashiCorp's repository)."
  type        = string
  default     = "1.22.3-1"
}

variable "consul_gossip_key" {
  description = "Consul gossip encryption key: `consul keygen`."
  type        = string
  sensitive   = true

  validation {
    condition     = can(base64decode(var.consul_gossip_key)) && length(base64decode(var.consul_gossip_key)) == 32
    error_message = "consul_gossip_key must be 32 random bytes in base64 (`consul keygen`)."
  }
}

variable "consul_management_token" {
  description = "Consul's initial management token, a UUID (`uuidgen`); the other tokens derive from it."
  type        = string
  sensitive   = true

  validation {
    condition     = can(regex("^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", var.consul_management_token))
    error_message = "consul_management_token must be a lower-case UUID (`uuidgen`)."
  }
}

variable "valkey_enabled" {
  description = "Create the ElastiCache for Valkey cluster and run the KVS on it."
  type        = bool
  default     = true
}

variable "valkey" {
  description = "The Valkey cluster: engine version, node type, shards and replicas per shard."
  type = object({
    engine_version     = optional(string, "8.0")
    node_type          = optional(string, "cache.r7g.large")
    shards             = optional(number, 3)
    replicas_per_shard = optional(number, 2)
  })
  default = {}
}

variable "valkey_auth_token" {
  description = "Valkey AUTH token: 16-128 letters and digits."
  type        = string
  sensitive   = true

  validation {
    condition     = can(regex("^[A-Za-z0-9]{16,128}$", var.valkey_auth_token))
    error_message = "valkey_auth_token must be 16-128 letters and digits."
  }
}

variable "tls_mode" {
  description = "\"consul\" (the default): mutual TLS with certificates from Consul's service-mesh CA and client tokens; \"files\": mutual TLS with the certificates in tls_certs_dir and client tokens; \"none\": plain gRPC inside the VPC (--insecure)."
  type        = string
  default     = "consul"

  validation {
    condition     = contains(["none", "files", "consul"], var.tls_mode)
    error_message = "tls_mode must be \"none\", \"files\" or \"consul\"."
  }
}

variable "tls_certs_dir" {
  description = "With tls_mode = \"files\": the directory `cbgrpc certs` wrote (ca.pem, <role>.pem, <role>-key.pem)."
  type        = string
  default     = ""

  validation {
    condition     = var.tls_mode != "files" || var.tls_certs_dir != ""
    error_message = "tls_mode = \"files\" needs tls_certs_dir: the directory `cbgrpc certs` wrote."
  }
}

variable "client_tokens_file" {
  description = "With tls_mode = \"files\" or \"consul\": the schedulers' tokens file (lines from `cbgrpc token`)."
  type        = string
  default     = ""

  validation {
    condition     = var.tls_mode == "none" || var.client_tokens_file != ""
    error_message = "tls_mode = \"files\" or \"consul\" needs client_tokens_file: the schedulers' tokens file."
  }
}

variable "otel_endpoint" {
  description = "OTLP endpoint for traces (e.g. http://collector:4317); empty: no export."
  type        = string
  default     = ""
}

variable "tags" {
  description = "Tags of every resource."
  type        = map(string)
  default     = {}
}
