variable "cluster_name" {
  description = "Name of the cluster; prefixes resource names and tags."
  type        = string

  validation {
    # 26 at most: the load balancer's name, "<cluster_name>-sched", may have 32.
    condition     = can(regex("^[a-z][a-z0-9-]{1,24}[a-z0-9]$", var.cluster_name))
    error_message = "cluster_name must be 3-26 characters of lower-case letters, digits and '-', starting with a letter."
  }
}

variable "vpc_cidr" {
  description = "CIDR block of the VPC (a /16 to /20)."
  type        = string
  default     = "10.40.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0)) && tonumber(split("/", var.vpc_cidr)[1]) >= 16 && tonumber(split("/", var.vpc_cidr)[1]) <= 20
    error_message = "vpc_cidr must be a valid IPv4 CIDR block from /16 to /20."
  }
}

variable "availability_zones" {
  description = "Availability zones to spread subnets over (at least two)."
  type        = list(string)

  validation {
    condition     = length(var.availability_zones) >= 2 && length(var.availability_zones) <= 6 && length(distinct(var.availability_zones)) == length(var.availability_zones)
    error_message = "availability_zones must list two to six distinct zones."
  }
}

variable "ports" {
  description = "gRPC port of each cbgrpc role, and the Prometheus metrics port every role serves."
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

  validation {
    condition     = length(distinct([var.ports.scheduler, var.ports.executor, var.ports.kvs, var.ports.metrics])) == 4 && alltrue([for p in [var.ports.scheduler, var.ports.executor, var.ports.kvs, var.ports.metrics] : p >= 1024 && p <= 65535 && !contains([8300, 8301, 8302, 8500, 8501, 8502, 8503, 8600], p)])
    error_message = "ports must be four distinct unprivileged ports (1024-65535) that Consul does not use."
  }
}

variable "valkey_port" {
  description = "Port of the Valkey cluster."
  type        = number
  default     = 6379
}

variable "client_cidrs" {
  description = "CIDR blocks allowed to call the schedulers through the load balancer."
  type        = list(string)

  validation {
    condition     = alltrue([for c in var.client_cidrs : can(cidrhost(c, 0))])
    error_message = "client_cidrs must be IPv4 CIDR blocks."
  }
}

variable "metrics_cidrs" {
  description = "CIDR blocks (inside the VPC) allowed to scrape the Prometheus metrics port; empty opens none."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.metrics_cidrs : can(cidrhost(c, 0))])
    error_message = "metrics_cidrs must be IPv4 CIDR blocks."
  }
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}

variable "tls_mode" {
  description = "Security of the cbgrpc services (the render module's tls_mode): \"consul\" lets the service roles reach the Consul servers' gRPC API."
  type        = string
  default     = "none"

  validation {
    condition     = contains(["none", "files", "consul"], var.tls_mode)
    error_message = "tls_mode must be \"none\", \"files\" or \"consul\"."
  }
}
