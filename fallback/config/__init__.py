"""The one typed configuration of the service.

`Settings` (schema.py) is the whole schema: every setting has a type, a
default and a line of documentation.  `load_settings` (load.py) layers the
sources, lowest first: defaults, then an optional TOML file, then
`FALLBACK_*` environment variables, then command-line flags, and validates
the result once (checks.py), failing fast with a one-line `ConfigError` that
names the setting.  What callers use is re-exported here.
"""

from fallback.config.checks import SMARTHOST_TLS, parse_forward_to, parse_hostport, validate
from fallback.config.load import (
    load_settings,
    parse_duration,
    parse_size,
    settings_env,
    settings_table,
)
from fallback.config.redisurl import redact_url
from fallback.config.schema import ENV_PREFIX, KIB, MIB, Settings, setting
from fallback.config.secretfiles import (
    admin_token,
    cookie_secure,
    metrics_token,
    read_secret_file,
    webmail_secret,
)

__all__ = [
    "ENV_PREFIX", "KIB", "MIB", "SMARTHOST_TLS", "Settings", "admin_token", "cookie_secure",
    "load_settings", "metrics_token", "parse_duration", "parse_forward_to", "parse_hostport", "parse_size",
    "read_secret_file", "redact_url", "setting", "settings_env", "settings_table", "validate",
    "webmail_secret",
]
