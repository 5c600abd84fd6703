"""Operations: failover scope, DNS, health, metrics, audit, notices and export."""
