variable "cluster_name" {
  description = "Name of the cluster (prefixes resource names)."
  type        = string
}

variable "vpc_cidr" {
  description = "CIDR block of the VPC to create (ignored with existing_vpc)."
  type        = string
}

variable "availability_zones" {
  description = "Zones of the subnets, in the order of the CIDR lists."
  type        = list(string)
}

variable "private_subnet_cidrs" {
  description = "One private subnet CIDR per zone (from the plan module)."
  type        = list(string)
}

variable "public_subnet_cidrs" {
  description = "One public subnet CIDR per zone (from the plan module)."
  type        = list(string)
}

variable "existing_vpc" {
  description = "Use this VPC and its subnets instead of creating them (its routing is left alone)."
  type = object({
    vpc_id             = string
    private_subnet_ids = list(string)
    public_subnet_ids  = list(string)
  })
  default = null
}

variable "single_nat_gateway" {
  description = "One NAT gateway for all zones (cheaper) instead of one per zone (survives a zone's loss)."
  type        = bool
  default     = false
}

variable "security_groups" {
  description = "Names of the security groups to create (from the plan module)."
  type        = list(string)
}

variable "group_rules" {
  description = "Rules between security groups (from the plan module)."
  type = map(object({
    from        = string
    to          = string
    port        = number
    protocol    = string
    description = string
  }))
}

variable "cidr_ingress_rules" {
  description = "Ingress rules from CIDR blocks (from the plan module)."
  type = map(object({
    to          = string
    cidr        = string
    port        = number
    protocol    = string
    description = string
  }))
}

variable "internet_egress" {
  description = "Egress to the internet per role (from the plan module)."
  type = map(object({
    from        = string
    port        = number
    description = string
  }))
}

variable "flow_log_retention_days" {
  description = "Days to keep the VPC flow log (rejected traffic) in CloudWatch Logs."
  type        = number
  default     = 365
}

variable "kms_key_arn" {
  description = "KMS key encrypting the flow log group."
  type        = string
}

variable "tags" {
  description = "Tags of every resource."
  type        = map(string)
  default     = {}
}
