output "dns_name" {
  description = "DNS name of the balancer."
  value       = aws_lb.this.dns_name
}

output "target_group_arn" {
  description = "Target group the schedulers' group registers in."
  value       = aws_lb_target_group.this.arn
}
