"""Mailboxes: messages in Redis (the write path, reads and changes), the directory,
passwords and provisioning."""
