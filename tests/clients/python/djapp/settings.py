"""Django settings built from PGSPLIT_URL (the proxy), in code."""

import os
from urllib.parse import unquote, urlsplit

_u = urlsplit(os.environ["PGSPLIT_URL"])

SECRET_KEY = "pgsplit-client-suite"
USE_TZ = True
INSTALLED_APPS = ["djapp"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _u.path.lstrip("/"),
        "USER": unquote(_u.username or ""),
        "PASSWORD": unquote(_u.password or ""),
        "HOST": _u.hostname,
        "PORT": str(_u.port or 5432),
        "OPTIONS": {"connect_timeout": 10},
        "TEST": {"NAME": "test_dj_pgsplit"},
    }
}
