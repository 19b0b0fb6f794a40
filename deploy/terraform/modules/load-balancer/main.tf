# A network load balancer in front of the schedulers: TCP on the gRPC port, so TLS passes
# through to the schedulers. NLB target groups cannot run gRPC health checks; the targets'
# health is the Consul agent's answer for the scheduler service, whose check is the
# scheduler's grpc.health.v1 (200 passing, 429 warning, 503 critical).

resource "aws_lb" "this" {
  # checkov:skip=CKV_AWS_91: NLB access logs cover TLS listeners only; this listener is TCP (TLS passes through to the schedulers).
  # checkov:skip=CKV_AWS_150: deletion protection is the deletion_protection variable, off by default so that `tofu destroy` of the example works.
  name                             = var.name
  load_balancer_type               = "network"
  internal                         = var.internal
  subnets                          = var.subnet_ids
  security_groups                  = var.security_group_ids
  enable_cross_zone_load_balancing = true
  enable_deletion_protection       = var.deletion_protection
  tags                             = var.tags
}

resource "aws_lb_target_group" "this" {
  name                 = var.name
  vpc_id               = var.vpc_id
  target_type          = "instance"
  protocol             = "TCP"
  port                 = var.port
  deregistration_delay = 30
  # The schedulers' security group admits the balancer's group, not the clients' addresses.
  preserve_client_ip = false

  health_check {
    protocol            = "HTTP"
    port                = tostring(var.health_check.port)
    path                = var.health_check.path
    matcher             = "200"
    interval            = 10
    healthy_threshold   = 2
    unhealthy_threshold = 2
  }

  tags = var.tags
}

resource "aws_lb_listener" "this" {
  load_balancer_arn = aws_lb.this.arn
  protocol          = "TCP"
  port              = var.port

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.this.arn
  }

  tags = var.tags
}
