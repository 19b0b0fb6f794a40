#!/usr/bin/env bash
# make terraform-e2e: the whole tree with the real AWS provider, offline.
#
# 1. Builds (or reuses) the AWS provider from the Go module proxy as a filesystem mirror.
# 2. `tofu init` + `tofu validate` of every AWS module and the example root, from the mirror.
# 3. `tofu test` of the example root against a mocked provider (examples/aws-cluster/tests).
# 4. plan, apply and destroy of the example against a moto server on 127.0.0.1, with
#    ElastiCache off (moto cannot create replication groups).
#
# Everything runs in a scratch copy of deploy/terraform, so no .terraform directory, state or
# lock file lands in the repository. Not part of CI (see deploy/terraform/README.md).
set -euo pipefail

here="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd -- "$here/../../.." && pwd)"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
cache_root="${CBGRPC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cloudburst-grpc}"

step() { printf '\n== %s\n' "$*"; }

tofu="$(bash "$repo/tools/tofu/build.sh" | tail -n 1)"
step "building or reusing the AWS provider"
mirror="$(bash "$repo/tools/terraform-provider-aws/build.sh" | tail -n 1)"
find "$mirror" -name 'terraform-provider-aws_*' -printf '%p (%s bytes)\n'

scratch="$(mktemp -d)"
moto_pid=""
cleanup() {
    if [[ -n "$moto_pid" ]] && kill -0 "$moto_pid" 2>/dev/null; then
        kill "$moto_pid"
        wait "$moto_pid" 2>/dev/null || true
    fi
    rm -rf -- "$scratch"
}
trap cleanup EXIT

cp -r "$repo/deploy/terraform" "$scratch/tree"
cat > "$scratch/tofurc" <<RC
provider_installation {
  filesystem_mirror {
    path    = "$mirror"
    include = ["registry.opentofu.org/hashicorp/aws"]
  }
}
RC
export TF_CLI_CONFIG_FILE="$scratch/tofurc" TF_IN_AUTOMATION=1 TF_INPUT=0 CHECKPOINT_DISABLE=1
tf() { (cd "$1" && shift && "$tofu" "$@"); }

step "init + validate, offline, from the mirror"
for dir in modules/network modules/instance-group modules/valkey modules/load-balancer examples/aws-cluster; do
    tf "$scratch/tree/$dir" init -backend=false -no-color > "$scratch/init.log" ||
        { cat "$scratch/init.log"; exit 1; }
    printf '%-28s ' "$dir"
    tf "$scratch/tree/$dir" validate -no-color
done

step "tofu test of the example root with mock_provider \"aws\""
tf "$scratch/tree/examples/aws-cluster" test -no-color

step "moto server"
moto_venv="$cache_root/moto-$(sed -n 's/^moto\[server\]==//p' "$repo/tools/moto/requirements.txt")"
if ! "$moto_venv/bin/moto_server" --help > /dev/null 2>&1; then
    rm -rf -- "$moto_venv"
    "$python" -m venv "$moto_venv"
    "$moto_venv/bin/python" -m pip install --quiet -r "$repo/tools/moto/requirements.txt"
fi
port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
# AWS-managed policies (AmazonSSMManagedInstanceCore, attached to every role) exist in moto
# only when it is told to load them.
MOTO_IAM_LOAD_MANAGED_POLICIES=true "$moto_venv/bin/moto_server" -H 127.0.0.1 -p "$port" > "$scratch/moto.log" 2>&1 &
moto_pid=$!
endpoint="http://127.0.0.1:$port"
deadline=$((SECONDS + 60))
until curl -sf "$endpoint/moto-api/" > /dev/null; do
    ((SECONDS < deadline)) || { cat "$scratch/moto.log"; echo "moto did not start" >&2; exit 1; }
    sleep 0.5
done
echo "moto on $endpoint"
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=eu-west-1
ami="$("$moto_venv/bin/python" -c "
import boto3
ec2 = boto3.client('ec2', endpoint_url='$endpoint', region_name='eu-west-1')
print(ec2.describe_images(Owners=['amazon'])['Images'][0]['ImageId'])")"

example="$scratch/tree/examples/aws-cluster"
cat > "$example/moto_override.tf" <<TF
provider "aws" {
  access_key                  = "testing"
  secret_key                  = "testing"
  skip_credentials_validation = true
  skip_metadata_api_check     = true
  skip_region_validation      = true
  s3_use_path_style           = true
  endpoints {
    autoscaling    = "$endpoint"
    cloudwatch     = "$endpoint"
    cloudwatchlogs = "$endpoint"
    ec2            = "$endpoint"
    elasticache    = "$endpoint"
    elbv2          = "$endpoint"
    iam            = "$endpoint"
    kms            = "$endpoint"
    s3             = "$endpoint"
    ssm            = "$endpoint"
    sts            = "$endpoint"
  }
}
TF
cat > "$example/moto.auto.tfvars" <<TF
client_cidrs            = ["203.0.113.0/24"]
zone_count              = 2
ami_id                  = "$ami"
valkey_enabled          = false
consul_gossip_key       = "MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTI="
consul_management_token = "0b7e4c2a-1d3f-4a5b-8c6d-7e8f9a0b1c2d"
valkey_auth_token       = "0123456789abcdef0123456789abcdef"
client_tokens_file      = "tests/certs/tokens"
TF

step "plan against moto"
tf "$example" plan -no-color -out="$scratch/plan" > "$scratch/plan.log" || { cat "$scratch/plan.log"; exit 1; }
grep -E '^Plan:' "$scratch/plan.log"
step "apply against moto"
tf "$example" apply -no-color -auto-approve "$scratch/plan" > "$scratch/apply.log" || { tail -n 80 "$scratch/apply.log"; exit 1; }
grep -E '^Apply complete' "$scratch/apply.log"
tf "$example" output -no-color scheduler_address
tf "$example" output -no-color autoscaling_groups
"$moto_venv/bin/python" - "$endpoint" <<'PY'
import sys
import boto3

endpoint = sys.argv[1]
asg = boto3.client("autoscaling", endpoint_url=endpoint, region_name="eu-west-1")
ec2 = boto3.client("ec2", endpoint_url=endpoint, region_name="eu-west-1")
for group in asg.describe_auto_scaling_groups()["AutoScalingGroups"]:
    tags = {t["Key"]: t["Value"] for t in group["Tags"] if t["PropagateAtLaunch"]}
    print(f"{group['AutoScalingGroupName']}: {len(group['Instances'])} instances, "
          f"join tag {tags.get('cloudburst:consul-join')!r}")
found = ec2.describe_instances(Filters=[
    {"Name": "tag:cloudburst:consul-join", "Values": ["cloudburst"]},
    {"Name": "tag:cloudburst:role", "Values": ["consul-server"]},
])
servers = [i for r in found["Reservations"] for i in r["Instances"]]
print(f"cloud auto-join's query finds {len(servers)} Consul server instances")
assert len(servers) == 3, servers
PY
step "destroy against moto"
tf "$example" destroy -no-color -auto-approve > "$scratch/destroy.log" || { tail -n 80 "$scratch/destroy.log"; exit 1; }
grep -E '^Destroy complete' "$scratch/destroy.log"
echo
echo "terraform-e2e: validate, mocked test, and plan/apply/destroy against moto passed"
