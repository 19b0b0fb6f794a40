"""Transport security: certificates, TLS credentials, identities, tokens and authorization.

See docs/security.md for how a cluster is secured.
"""
