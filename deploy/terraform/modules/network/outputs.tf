output "vpc_id" {
  description = "The VPC's id."
  value       = local.vpc_id
}

output "private_subnet_ids" {
  description = "Private subnets, one per zone."
  value       = local.private_subnet_ids
}

output "public_subnet_ids" {
  description = "Public subnets, one per zone."
  value       = local.public_subnet_ids
}

output "security_group_ids" {
  description = "Security group id by role name."
  value       = { for k, sg in aws_security_group.this : k => sg.id }
}
