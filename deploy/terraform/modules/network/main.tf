# The VPC (or an existing one), private subnets in every zone, public subnets for the load
# balancer and the NAT gateways only, and one security group per role whose rules come from
# the plan module's list of who calls whom.

locals {
  create_vpc         = var.existing_vpc == null
  vpc_id             = local.create_vpc ? aws_vpc.this[0].id : var.existing_vpc.vpc_id
  private_subnet_ids = local.create_vpc ? aws_subnet.private[*].id : var.existing_vpc.private_subnet_ids
  public_subnet_ids  = local.create_vpc ? aws_subnet.public[*].id : var.existing_vpc.public_subnet_ids
  zone_count         = length(var.availability_zones)
  nat_count          = local.create_vpc ? (var.single_nat_gateway ? 1 : local.zone_count) : 0
}

resource "aws_vpc" "this" {
  count                = local.create_vpc ? 1 : 0
  cidr_block           = var.vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true
  tags                 = merge(var.tags, { Name = var.cluster_name })
}

# The default security group of a new VPC allows all traffic between its members: empty it.
resource "aws_default_security_group" "this" {
  count  = local.create_vpc ? 1 : 0
  vpc_id = aws_vpc.this[0].id
  tags   = merge(var.tags, { Name = "${var.cluster_name}-default-unused" })
}

resource "aws_subnet" "private" {
  count             = local.create_vpc ? local.zone_count : 0
  vpc_id            = aws_vpc.this[0].id
  cidr_block        = var.private_subnet_cidrs[count.index]
  availability_zone = var.availability_zones[count.index]
  tags              = merge(var.tags, { Name = "${var.cluster_name}-private-${var.availability_zones[count.index]}", "cloudburst:tier" = "private" })
}

resource "aws_subnet" "public" {
  count             = local.create_vpc ? local.zone_count : 0
  vpc_id            = aws_vpc.this[0].id
  cidr_block        = var.public_subnet_cidrs[count.index]
  availability_zone = var.availability_zones[count.index]
  # Nothing launched here gets a public address; the load balancer and NAT gateways bring theirs.
  map_public_ip_on_launch = false
  tags                    = merge(var.tags, { Name = "${var.cluster_name}-public-${var.availability_zones[count.index]}", "cloudburst:tier" = "public" })
}

resource "aws_internet_gateway" "this" {
  count  = local.create_vpc ? 1 : 0
  vpc_id = aws_vpc.this[0].id
  tags   = merge(var.tags, { Name = var.cluster_name })
}

resource "aws_eip" "nat" {
  count  = local.nat_count
  domain = "vpc"
  tags   = merge(var.tags, { Name = "${var.cluster_name}-nat-${count.index}" })
}

resource "aws_nat_gateway" "this" {
  count         = local.nat_count
  allocation_id = aws_eip.nat[count.index].id
  subnet_id     = aws_subnet.public[count.index].id
  tags          = merge(var.tags, { Name = "${var.cluster_name}-nat-${count.index}" })
  depends_on    = [aws_internet_gateway.this]
}

resource "aws_route_table" "public" {
  count  = local.create_vpc ? 1 : 0
  vpc_id = aws_vpc.this[0].id
  tags   = merge(var.tags, { Name = "${var.cluster_name}-public" })
}

resource "aws_route" "public_internet" {
  count                  = local.create_vpc ? 1 : 0
  route_table_id         = aws_route_table.public[0].id
  destination_cidr_block = "0.0.0.0/0"
  gateway_id             = aws_internet_gateway.this[0].id
}

resource "aws_route_table_association" "public" {
  count          = local.create_vpc ? local.zone_count : 0
  subnet_id      = aws_subnet.public[count.index].id
  route_table_id = aws_route_table.public[0].id
}

resource "aws_route_table" "private" {
  count  = local.create_vpc ? local.zone_count : 0
  vpc_id = aws_vpc.this[0].id
  tags   = merge(var.tags, { Name = "${var.cluster_name}-private-${var.availability_zones[count.index]}" })
}

resource "aws_route" "private_nat" {
  count                  = local.create_vpc ? local.zone_count : 0
  route_table_id         = aws_route_table.private[count.index].id
  destination_cidr_block = "0.0.0.0/0"
  nat_gateway_id         = aws_nat_gateway.this[var.single_nat_gateway ? 0 : count.index].id
}

resource "aws_route_table_association" "private" {
  count          = local.create_vpc ? local.zone_count : 0
  subnet_id      = aws_subnet.private[count.index].id
  route_table_id = aws_route_table.private[count.index].id
}

# Rejected traffic, for diagnosing a rule that is missing.
resource "aws_cloudwatch_log_group" "flow" {
  count             = local.create_vpc ? 1 : 0
  name              = "/cloudburst/${var.cluster_name}/vpc-flow"
  retention_in_days = var.flow_log_retention_days
  kms_key_id        = var.kms_key_arn
  tags              = var.tags
}

data "aws_iam_policy_document" "flow_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["vpc-flow-logs.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "flow_write" {
  count = local.create_vpc ? 1 : 0
  statement {
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"]
    resources = ["${aws_cloudwatch_log_group.flow[0].arn}:*"]
  }
}

resource "aws_iam_role" "flow" {
  count              = local.create_vpc ? 1 : 0
  name               = "${var.cluster_name}-vpc-flow"
  assume_role_policy = data.aws_iam_policy_document.flow_assume.json
  tags               = var.tags
}

resource "aws_iam_role_policy" "flow" {
  count  = local.create_vpc ? 1 : 0
  name   = "write-flow-log"
  role   = aws_iam_role.flow[0].id
  policy = data.aws_iam_policy_document.flow_write[0].json
}

resource "aws_flow_log" "this" {
  count           = local.create_vpc ? 1 : 0
  vpc_id          = aws_vpc.this[0].id
  traffic_type    = "REJECT"
  log_destination = aws_cloudwatch_log_group.flow[0].arn
  iam_role_arn    = aws_iam_role.flow[0].arn
  tags            = var.tags
}

resource "aws_security_group" "this" {
  # checkov:skip=CKV2_AWS_5: attached in other modules (launch templates, load balancer, Valkey), which checkov does not follow from here.
  for_each    = toset(var.security_groups)
  name        = "${var.cluster_name}-${replace(each.key, "_", "-")}"
  description = "cloudburst ${replace(each.key, "_", " ")}: only the ports it serves, to the roles that call it"
  vpc_id      = local.vpc_id
  tags        = merge(var.tags, { Name = "${var.cluster_name}-${replace(each.key, "_", "-")}" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "from_group" {
  for_each                     = var.group_rules
  security_group_id            = aws_security_group.this[each.value.to].id
  referenced_security_group_id = aws_security_group.this[each.value.from].id
  ip_protocol                  = each.value.protocol
  from_port                    = each.value.port
  to_port                      = each.value.port
  description                  = "from ${each.value.from}: ${each.value.description}"
  tags                         = var.tags
}

resource "aws_vpc_security_group_egress_rule" "to_group" {
  for_each                     = var.group_rules
  security_group_id            = aws_security_group.this[each.value.from].id
  referenced_security_group_id = aws_security_group.this[each.value.to].id
  ip_protocol                  = each.value.protocol
  from_port                    = each.value.port
  to_port                      = each.value.port
  description                  = "to ${each.value.to}: ${each.value.description}"
  tags                         = var.tags
}

resource "aws_vpc_security_group_ingress_rule" "from_cidr" {
  for_each          = var.cidr_ingress_rules
  security_group_id = aws_security_group.this[each.value.to].id
  cidr_ipv4         = each.value.cidr
  ip_protocol       = each.value.protocol
  from_port         = each.value.port
  to_port           = each.value.port
  description       = each.value.description
  tags              = var.tags
}

resource "aws_vpc_security_group_egress_rule" "internet" {
  for_each          = var.internet_egress
  security_group_id = aws_security_group.this[each.value.from].id
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "tcp"
  from_port         = each.value.port
  to_port           = each.value.port
  description       = each.value.description
  tags              = var.tags
}
