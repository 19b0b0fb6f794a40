"""Function-to-function messaging: mailboxes per invocation, routed by mailbox id."""
