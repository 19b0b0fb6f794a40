output "user_data" {
  description = "The cloud-init user data (#cloud-config) of an instance of this role."
  value       = local.user_data
}

output "cloud_config" {
  description = "The user data as an object (what user_data is the YAML of)."
  value       = local.cloud_config
}

output "consul_config" {
  description = "The Consul agent configuration (JSON) without its secrets."
  value       = jsonencode(local.consul_config)
}

output "cbgrpc_config" {
  description = "The cbgrpc TOML config file (empty for consul_server)."
  value       = local.cbgrpc_config
}

output "config_path" {
  description = "Where the cbgrpc config file is written on the instance."
  value       = local.config_path
}

output "command" {
  description = "The cbgrpc command line of this role, as a list (empty for consul_server)."
  value       = local.command
}

output "units" {
  description = "The systemd units this role installs: file name -> contents."
  value       = local.units
}

output "scripts" {
  description = "The boot scripts this role installs: path -> contents."
  value       = local.scripts
}

output "acl_policies" {
  description = "The Consul ACL policies the servers create: name -> rules."
  value       = local.is_server ? local.acl_policies : {}
}

output "token_accessors" {
  description = "Accessor ids of the agent and role tokens (not secret)."
  value       = local.token_accessors
}

output "start_units" {
  description = "Units enabled and started at first boot, in order."
  value       = local.start_units
}
