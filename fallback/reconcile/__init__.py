"""Reconcile: carrying the fallback's messages into the main store over IMAP, and the run's report."""
