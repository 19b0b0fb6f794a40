# tflint for every module and the example root (tests/deploy runs `tflint --recursive`).
# The AWS ruleset is built from the Go module proxy (tools/tflint/build.sh) and found through
# TFLINT_PLUGIN_DIR: no `source`, so tflint downloads nothing.

config {
  call_module_type = "none"
}

plugin "terraform" {
  enabled = true
  preset  = "all"
}

plugin "aws" {
  enabled = true
}
