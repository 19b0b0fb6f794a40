output "configuration_endpoint" {
  description = "Host name of the cluster's configuration endpoint (what cluster clients connect to)."
  value       = aws_elasticache_replication_group.this.configuration_endpoint_address
}

output "port" {
  description = "Port of the cluster."
  value       = var.port
}
