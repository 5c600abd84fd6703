"""Queues: the reliable-queue loop, outbound and forward queues, their SMTP clients, DSN and DKIM."""
