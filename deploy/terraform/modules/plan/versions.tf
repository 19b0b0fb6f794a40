terraform {
  # Provider-free: `tofu test` runs this module for real with no provider installed.
  required_version = ">= 1.8.0"
}
