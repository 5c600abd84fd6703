"""Intake: the SMTP receiver (with its aiosmtpd adapter) and what it reads off the wire, mail
composed in the webmail, and where each recipient goes (routing)."""
