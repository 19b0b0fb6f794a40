variable "name" {
  description = "Replication group id (1-40 lower-case letters, digits and hyphens)."
  type        = string
}

variable "engine_version" {
  description = "Valkey version (see docs/aws.md for why this one: functions, sharded pub/sub and WAIT)."
  type        = string
  default     = "8.0"

  validation {
    condition     = can(regex("^(7\\.2|8\\.[0-9]+)$", var.engine_version))
    error_message = "engine_version must be 7.2 or 8.x: older engines lack functions or sharded pub/sub."
  }
}

variable "node_type" {
  description = "Cache node type."
  type        = string
  default     = "cache.r7g.large"
}

variable "shards" {
  description = "Number of shards (node groups)."
  type        = number
  default     = 3
}

variable "replicas_per_shard" {
  description = "Replicas of each shard's primary (2 survives a zone's loss with a replica to spare)."
  type        = number
  default     = 2

  validation {
    condition     = var.replicas_per_shard >= 1 && var.replicas_per_shard <= 5
    error_message = "replicas_per_shard must be 1 to 5 (automatic failover needs at least one)."
  }
}

variable "subnet_ids" {
  description = "Private subnets, in at least two zones."
  type        = list(string)
}

variable "security_group_ids" {
  description = "Security groups (the plan's valkey group: the KVS role only)."
  type        = list(string)
}

variable "auth_token" {
  description = "AUTH token (16-128 letters and digits); also stored in Parameter Store for the KVS."
  type        = string
  sensitive   = true
}

variable "kms_key_arn" {
  description = "KMS key for encryption at rest and of the slow log."
  type        = string
}

variable "snapshot_retention_days" {
  description = "Days of daily snapshots to keep."
  type        = number
  default     = 7
}

variable "port" {
  description = "Port of the cluster."
  type        = number
  default     = 6379
}

variable "tags" {
  description = "Tags of every resource."
  type        = map(string)
  default     = {}
}
