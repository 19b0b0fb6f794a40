# The example cluster: copy this directory, set the variables (terraform.tfvars.example),
# `tofu init && tofu apply`. See docs/aws.md.

data "aws_availability_zones" "available" {
  # checkov:skip=CKV_AWS_394: zone_count takes the first zones by name; a zone AWS adds later sorts after them, so the set in use does not change.
  state = "available"
}

data "aws_ami" "debian" {
  count       = var.ami_id == null ? 1 : 0
  most_recent = true
  owners      = ["136693071363"] # Debian's AWS account
  filter {
    name   = "name"
    values = ["debian-12-amd64-*"]
  }
  filter {
    name   = "architecture"
    values = ["x86_64"]
  }
}

locals {
  zones            = slice(data.aws_availability_zones.available.names, 0, var.zone_count)
  ami_id           = var.ami_id != null ? var.ami_id : data.aws_ami.debian[0].id
  parameter_prefix = "/cloudburst/${var.cluster_name}"
  cbgrpc_roles     = ["scheduler", "executor", "kvs"]
  roles            = concat(["consul_server"], local.cbgrpc_roles)
  scaling_metric   = { namespace = "Cloudburst", metric_name = "ExecutorUtilization" }

  # Every other Consul token derives from the management token, so one secret is enough.
  tokens = merge(
    { agent = uuidv5("url", "cloudburst-grpc:${var.consul_management_token}:agent") },
    { for r in local.cbgrpc_roles : r => uuidv5("url", "cloudburst-grpc:${var.consul_management_token}:${r}") },
  )

  # TLS files per role: the CA, the role's certificate and key (tls_mode = "files"; with
  # "consul", Consul's CA signs them), and the schedulers' client tokens.
  tls = var.tls_mode != "none"
  tls_files = {
    for r in local.cbgrpc_roles : r => concat(
      var.tls_mode == "files" ? ["ca.pem", "${r}.pem", "${r}-key.pem"] : [],
      r == "scheduler" ? ["tokens"] : [],
    )
  }
  tls_secrets = {
    for f in distinct(flatten(values(local.tls_files))) :
    "tls/${f}" => f == "tokens" ? file(var.client_tokens_file) : file("${var.tls_certs_dir}/${f}") if local.tls
  }

  # Which parameters each role may read.
  role_parameters = {
    consul_server = concat(["consul/gossip-key", "consul/agent-token", "consul/management-token"], [for r in local.cbgrpc_roles : "consul/token/${r}"])
    scheduler     = concat(["consul/gossip-key", "consul/agent-token", "consul/token/scheduler"], local.tls ? [for f in local.tls_files.scheduler : "tls/${f}"] : [])
    executor      = concat(["consul/gossip-key", "consul/agent-token", "consul/token/executor"], local.tls ? [for f in local.tls_files.executor : "tls/${f}"] : [])
    kvs           = concat(["consul/gossip-key", "consul/agent-token", "consul/token/kvs"], var.valkey_enabled ? ["valkey/auth-token"] : [], local.tls ? [for f in local.tls_files.kvs : "tls/${f}"] : [])
  }
  secret_names = concat(
    ["consul/gossip-key", "consul/management-token", "consul/agent-token"],
    [for r in local.cbgrpc_roles : "consul/token/${r}"],
    var.valkey_enabled ? ["valkey/auth-token"] : [],
    local.tls ? [for f in distinct(flatten(values(local.tls_files))) : "tls/${f}"] : [],
  )
  secrets = merge(
    {
      "consul/gossip-key"       = var.consul_gossip_key
      "consul/management-token" = var.consul_management_token
      "consul/agent-token"      = local.tokens.agent
    },
    { for r in local.cbgrpc_roles : "consul/token/${r}" => local.tokens[r] },
    var.valkey_enabled ? { "valkey/auth-token" = var.valkey_auth_token } : {},
    local.tls_secrets,
  )

  sizes = {
    consul_server = { min = var.consul_servers, max = var.consul_servers }
    scheduler     = var.schedulers
    executor      = var.executors
    kvs           = var.kvs_processes
  }
}

module "plan" {
  source             = "../../modules/plan"
  cluster_name       = var.cluster_name
  vpc_cidr           = var.vpc_cidr
  availability_zones = local.zones
  ports              = var.ports
  tls_mode           = var.tls_mode
  client_cidrs       = var.client_cidrs
  metrics_cidrs      = var.metrics_cidrs
  tags               = var.tags
}

data "aws_caller_identity" "current" {}

data "aws_iam_policy_document" "key" {
  # checkov:skip=CKV_AWS_109: a key policy's "*" resource is the key itself; the account administers its own key (AWS's default key policy).
  # checkov:skip=CKV_AWS_111: as above: in a key policy, "*" means this key only.
  # checkov:skip=CKV_AWS_356: as above: in a key policy, "*" means this key only.
  # The account administers the key; services use it through the grants of their roles.
  statement {
    sid       = "AccountAdministers"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:aws:iam::${data.aws_caller_identity.current.account_id}:root"]
    }
  }
  # CloudWatch Logs encrypts the flow and slow logs with it.
  statement {
    sid       = "CloudWatchLogsEncrypts"
    actions   = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["logs.${var.region}.amazonaws.com"]
    }
  }
}

resource "aws_kms_key" "cluster" {
  description             = "${var.cluster_name}: secrets, logs and the Valkey cluster"
  enable_key_rotation     = true
  deletion_window_in_days = 14
  policy                  = data.aws_iam_policy_document.key.json
}

resource "aws_kms_alias" "cluster" {
  name          = "alias/${var.cluster_name}"
  target_key_id = aws_kms_key.cluster.key_id
}

resource "aws_ssm_parameter" "secret" {
  for_each = toset(local.secret_names)
  name     = "${local.parameter_prefix}/${each.key}"
  type     = "SecureString"
  key_id   = aws_kms_key.cluster.arn
  value    = local.secrets[each.key]
}

module "network" {
  source               = "../../modules/network"
  cluster_name         = var.cluster_name
  vpc_cidr             = var.vpc_cidr
  availability_zones   = local.zones
  private_subnet_cidrs = module.plan.private_subnet_cidrs
  public_subnet_cidrs  = module.plan.public_subnet_cidrs
  existing_vpc         = var.existing_vpc
  single_nat_gateway   = var.single_nat_gateway
  security_groups      = module.plan.security_groups
  group_rules          = module.plan.group_rules
  cidr_ingress_rules   = module.plan.cidr_ingress_rules
  internet_egress      = module.plan.internet_egress
  kms_key_arn          = aws_kms_key.cluster.arn
  tags                 = module.plan.base_tags
}

module "valkey" {
  source             = "../../modules/valkey"
  count              = var.valkey_enabled ? 1 : 0
  name               = "${var.cluster_name}-kvs"
  engine_version     = var.valkey.engine_version
  node_type          = var.valkey.node_type
  shards             = var.valkey.shards
  replicas_per_shard = var.valkey.replicas_per_shard
  subnet_ids         = module.network.private_subnet_ids
  security_group_ids = [module.network.security_group_ids["valkey"]]
  auth_token         = var.valkey_auth_token
  kms_key_arn        = aws_kms_key.cluster.arn
  tags               = module.plan.base_tags
}

# The project's wheel, when one is given, goes to a private bucket the instances read.
resource "aws_s3_bucket" "artifacts" {
  # checkov:skip=CKV_AWS_18: holds only the wheel this root uploads; every apply can upload it again, so no access log is needed.
  # checkov:skip=CKV_AWS_144: the wheel is re-uploaded from the user's machine; a replica in another region adds nothing.
  # checkov:skip=CKV2_AWS_61: one object, replaced by the next apply; versioning keeps the previous one, nothing to expire.
  # checkov:skip=CKV2_AWS_62: nothing reacts to uploads; instances read the wheel at first boot.
  count         = var.wheel_path == "" ? 0 : 1
  bucket_prefix = "${var.cluster_name}-artifacts-"
  force_destroy = true
}

resource "aws_s3_bucket_public_access_block" "artifacts" {
  count                   = var.wheel_path == "" ? 0 : 1
  bucket                  = aws_s3_bucket.artifacts[0].id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_server_side_encryption_configuration" "artifacts" {
  count  = var.wheel_path == "" ? 0 : 1
  bucket = aws_s3_bucket.artifacts[0].id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.cluster.arn
    }
  }
}

resource "aws_s3_bucket_versioning" "artifacts" {
  count  = var.wheel_path == "" ? 0 : 1
  bucket = aws_s3_bucket.artifacts[0].id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_object" "wheel" {
  count  = var.wheel_path == "" ? 0 : 1
  bucket = aws_s3_bucket.artifacts[0].id
  key    = "wheels/${basename(var.wheel_path)}"
  source = var.wheel_path
  etag   = filemd5(var.wheel_path)
}

module "render" {
  source           = "../../modules/render"
  for_each         = toset(local.roles)
  role             = each.key
  cluster_name     = var.cluster_name
  region           = var.region
  parameter_prefix = local.parameter_prefix
  consul = {
    server_count = var.consul_servers
    join_tag     = module.plan.consul_join_tag
    version      = var.consul_version
  }
  ports = var.ports
  package = {
    requirement  = var.package_requirement
    wheel_s3_uri = var.wheel_path == "" ? "" : "s3://${aws_s3_bucket.artifacts[0].id}/${aws_s3_object.wheel[0].key}"
  }
  valkey = {
    enabled  = var.valkey_enabled
    endpoint = var.valkey_enabled ? module.valkey[0].configuration_endpoint : ""
    port     = 6379
  }
  tls_mode         = var.tls_mode
  otel             = { endpoint = var.otel_endpoint }
  metrics          = merge(local.scaling_metric, { autoscaling_group = "${var.cluster_name}-executor" })
  executor_threads = var.executor_threads
}

module "load_balancer" {
  source             = "../../modules/load-balancer"
  name               = "${var.cluster_name}-sched"
  vpc_id             = module.network.vpc_id
  subnet_ids         = var.internal_load_balancer ? module.network.private_subnet_ids : module.network.public_subnet_ids
  internal           = var.internal_load_balancer
  security_group_ids = [module.network.security_group_ids["nlb"]]
  port               = var.ports.scheduler
  health_check = {
    port = module.plan.consul_ports.http
    path = "/v1/agent/health/service/name/cloudburst-scheduler"
  }
  tags = module.plan.base_tags
}

module "group" {
  source                = "../../modules/instance-group"
  for_each              = toset(local.roles)
  name                  = "${var.cluster_name}-${replace(each.key, "_", "-")}"
  ami_id                = local.ami_id
  instance_type         = var.instance_types[each.key]
  user_data             = module.render[each.key].user_data
  subnet_ids            = module.network.private_subnet_ids
  security_group_ids    = [module.network.security_group_ids[each.key]]
  min_size              = local.sizes[each.key].min
  max_size              = local.sizes[each.key].max
  desired_capacity      = local.sizes[each.key].min
  target_group_arns     = each.key == "scheduler" ? [module.load_balancer.target_group_arn] : []
  parameter_arns        = [for p in local.role_parameters[each.key] : aws_ssm_parameter.secret[p].arn]
  parameter_kms_key_arn = aws_kms_key.cluster.arn
  wheel_object_arn      = var.wheel_path == "" ? "" : "${aws_s3_bucket.artifacts[0].arn}/${aws_s3_object.wheel[0].key}"
  cloudwatch_namespace  = each.key == "executor" ? local.scaling_metric.namespace : ""
  target_tracking       = each.key == "executor" ? merge(local.scaling_metric, { target = var.executor_target_utilization }) : null
  tags                  = module.plan.role_tags[each.key]
}
