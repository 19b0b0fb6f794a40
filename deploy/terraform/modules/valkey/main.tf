# ElastiCache for Valkey in cluster mode: shards with replicas spread over zones, automatic
# failover, TLS in transit, AUTH, encryption at rest. The KVS reaches it through the
# configuration endpoint. MemoryDB for Valkey is the alternative for durable acknowledged
# writes (docs/aws.md).

resource "aws_elasticache_subnet_group" "this" {
  name        = var.name
  description = "Private subnets of the ${var.name} Valkey cluster"
  subnet_ids  = var.subnet_ids
  tags        = var.tags
}

resource "aws_cloudwatch_log_group" "slow" {
  name              = "/cloudburst/${var.name}/valkey-slow-log"
  retention_in_days = 365
  kms_key_id        = var.kms_key_arn
  tags              = var.tags
}

resource "aws_elasticache_replication_group" "this" {
  replication_group_id = var.name
  description          = "cloudburst KVS storage"
  engine               = "valkey"
  engine_version       = var.engine_version
  # The engine's defaults are what the KVS needs (functions, sharded pub/sub and WAIT are on
  # by default); a custom group is only for tuning.
  # tflint-ignore: aws_elasticache_replication_group_default_parameter_group
  parameter_group_name = "default.valkey${split(".", var.engine_version)[0]}.cluster.on"
  node_type            = var.node_type
  port                 = var.port

  cluster_mode               = "enabled"
  num_node_groups            = var.shards
  replicas_per_node_group    = var.replicas_per_shard
  automatic_failover_enabled = true
  multi_az_enabled           = true

  subnet_group_name  = aws_elasticache_subnet_group.this.name
  security_group_ids = var.security_group_ids

  transit_encryption_enabled = true
  transit_encryption_mode    = "required"
  auth_token                 = var.auth_token
  auth_token_update_strategy = "ROTATE"
  at_rest_encryption_enabled = true
  kms_key_id                 = var.kms_key_arn

  snapshot_retention_limit   = var.snapshot_retention_days
  auto_minor_version_upgrade = true
  apply_immediately          = false

  log_delivery_configuration {
    destination      = aws_cloudwatch_log_group.slow.name
    destination_type = "cloudwatch-logs"
    log_format       = "json"
    log_type         = "slow-log"
  }

  tags = var.tags
}
