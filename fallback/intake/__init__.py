"""Intake: the SMTP receiver, what it reads off the wire, and where each recipient goes."""
