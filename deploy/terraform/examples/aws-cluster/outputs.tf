output "scheduler_address" {
  description = "What a client passes to CloudburstConnection: the load balancer's host:port."
  value       = "${module.load_balancer.dns_name}:${var.ports.scheduler}"
}

output "consul_ui" {
  description = "The Consul UI, through a Session Manager port forward to a Consul server (see reach_the_cluster)."
  value       = "http://127.0.0.1:8500/ui (log in with the management token)"
}

output "reach_the_cluster" {
  description = "Shell commands: a shell on an instance, and the Consul UI on this machine's port 8500."
  value       = <<-EOT
    # Any instance of a role (consul-server, scheduler, executor, kvs):
    id=$(aws ec2 describe-instances --region ${var.region} --output text \
      --filters Name=tag:cloudburst:cluster,Values=${var.cluster_name} Name=tag:cloudburst:role,Values=consul-server \
                Name=instance-state-name,Values=running \
      --query 'Reservations[0].Instances[0].InstanceId')
    aws ssm start-session --region ${var.region} --target "$id"
    # The Consul UI at http://127.0.0.1:8500/ui:
    aws ssm start-session --region ${var.region} --target "$id" \
      --document-name AWS-StartPortForwardingSession --parameters portNumber=8500,localPortNumber=8500
  EOT
}

output "valkey_configuration_endpoint" {
  description = "The Valkey cluster's configuration endpoint (null without Valkey)."
  value       = var.valkey_enabled ? module.valkey[0].configuration_endpoint : null
}

output "autoscaling_groups" {
  description = "Autoscaling group of each role."
  value       = { for r, g in module.group : r => g.autoscaling_group_name }
}
