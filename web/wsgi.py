"""The WSGI entry point gunicorn loads (`web.wsgi:app`): settings from FALLBACK_* variables.

`fallback up` and `fallback web` start gunicorn with the process's settings
in the environment (fallback.config.settings_env), so the app here is built
from exactly the configuration the operator gave.
"""

from __future__ import annotations

from fallback.config import load_settings
from web import create_app

app = create_app(load_settings())
