variable "name" {
  description = "Name of the group, e.g. demo-executor (names the ASG, launch template and IAM role)."
  type        = string
}

variable "ami_id" {
  description = "AMI of the instances (Debian 12: cloud-init, Python 3.11, systemd)."
  type        = string
}

variable "instance_type" {
  description = "EC2 instance type."
  type        = string
}

variable "user_data" {
  description = "cloud-init user data (from the render module)."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets to launch into (one per zone)."
  type        = list(string)
}

variable "security_group_ids" {
  description = "Security groups of the instances (the role's own group)."
  type        = list(string)
}

variable "min_size" {
  description = "Least number of instances."
  type        = number
}

variable "max_size" {
  description = "Most number of instances."
  type        = number
}

variable "desired_capacity" {
  description = "Instances to start with (null: leave it to scaling once created)."
  type        = number
  default     = null
}

variable "root_volume_gb" {
  description = "Size of the encrypted root volume."
  type        = number
  default     = 20
}

variable "kms_key_arn" {
  description = <<-EOT
    KMS key encrypting the root volumes; null: the account's default EBS key. A key of your
    own must let the autoscaling service-linked role use it (grants for EBS).
  EOT
  type        = string
  default     = null
}

variable "target_group_arns" {
  description = "Load balancer target groups to register the instances in."
  type        = list(string)
  default     = []
}

variable "parameter_arns" {
  description = "SSM parameters (secrets) the instances may read."
  type        = list(string)
}

variable "parameter_kms_key_arn" {
  description = "KMS key the parameters are encrypted with (Decrypt is granted through SSM only)."
  type        = string
}

variable "wheel_object_arn" {
  description = "S3 object of the project's wheel the instances install (empty: from the package index)."
  type        = string
  default     = ""
}

variable "cloudwatch_namespace" {
  description = "CloudWatch namespace the instances may publish metrics to (empty: none)."
  type        = string
  default     = ""
}

variable "target_tracking" {
  description = "Scale on this CloudWatch metric (namespace, name, target value), or null for a fixed-size group."
  type = object({
    namespace   = string
    metric_name = string
    target      = number
  })
  default = null
}

variable "tags" {
  description = "Tags of the group and, propagated at launch, of its instances."
  type        = map(string)
}
