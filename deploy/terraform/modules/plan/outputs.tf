output "private_subnet_cidrs" {
  description = "One private subnet CIDR per availability zone, in the zones' order."
  value       = local.private_subnet_cidrs
}

output "public_subnet_cidrs" {
  description = "One public subnet CIDR per availability zone (load balancer and NAT only)."
  value       = local.public_subnet_cidrs
}

output "consul_ports" {
  description = "Consul's ports by name."
  value       = local.consul_ports
}

output "ports" {
  description = "The cbgrpc roles' gRPC ports and the metrics port."
  value       = var.ports
}

output "security_groups" {
  description = "Names of the security groups to create."
  value       = local.security_groups
}

output "calls" {
  description = "Who calls whom: caller -> list of { to, port, protocol, why }."
  value       = local.calls
}

output "group_rules" {
  description = "Security-group-to-security-group rules, keyed by key: each opens `port` on `to` to `from`."
  value       = { for r in local.group_rules : r.key => r }
}

output "cidr_ingress_rules" {
  description = "Ingress rules from CIDR blocks outside the cluster."
  value       = { for r in local.cidr_ingress_rules : r.key => r }
}

output "internet_egress" {
  description = "Egress to the internet (through NAT) per agent role."
  value       = local.internet_egress
}

output "base_tags" {
  description = "Tags of every resource."
  value       = local.base_tags
}

output "role_tags" {
  description = "Tags of each role's instances, including the Consul cloud auto-join tag."
  value       = local.role_tags
}

output "consul_join_tag" {
  description = "The EC2 tag Consul's cloud auto-join looks for."
  value       = local.consul_join_tag
}
