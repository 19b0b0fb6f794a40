variable "name" {
  description = "Name of the load balancer and its target group (at most 32 characters)."
  type        = string
}

variable "vpc_id" {
  description = "The VPC."
  type        = string
}

variable "subnet_ids" {
  description = "Public subnets (or private ones for an internal balancer), one per zone."
  type        = list(string)
}

variable "internal" {
  description = "An internal balancer, reachable only inside the VPC and its peers."
  type        = bool
  default     = false
}

variable "security_group_ids" {
  description = "Security groups of the balancer (the plan's nlb group)."
  type        = list(string)
}

variable "port" {
  description = "The schedulers' gRPC port: the listener's and the targets' (TLS passes through)."
  type        = number
}

variable "health_check" {
  description = "HTTP health check of the targets: the local Consul agent's view of the scheduler's grpc.health.v1."
  type = object({
    port = number
    path = string
  })
}

variable "deletion_protection" {
  description = "Refuse to delete the balancer until this is turned off."
  type        = bool
  default     = false
}

variable "tags" {
  description = "Tags of every resource."
  type        = map(string)
  default     = {}
}
