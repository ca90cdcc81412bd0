"""Settings of the example project.

The seed's Quick Start step 1 used ``DjangoConfig(websocket_rpc=...)`` from another framework;
plain Django does the same with ``to_django_settings()`` directly (below).
"""

import os
from pathlib import Path

from rpc_tasks import WebSocketRPCConfig
from rpc_tasks.contrib.django import DRAMATIQ_ENCODER as RPC_ENCODER
from rpc_tasks.contrib.django import dramatiq_broker_settings

BASE_DIR = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/2")
#: Prefix for every Redis name of this project (tests use a unique one).
PREFIX = os.environ.get("RPC_EXAMPLE_PREFIX", "")

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "dev-only-insecure-key-change-me")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "rpc_tasks.contrib.django",  # before django_dramatiq: reports a broken DRAMATIQ_BROKER first
    "django_dramatiq",
    "notifications",
]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "project.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": []},
    }
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DJANGO_DB", str(BASE_DIR / "db.sqlite3")),
    }
}
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- rpc-tasks (the seed's Quick Start, step 1) -------------------------------------------------
WEBSOCKET_RPC = WebSocketRPCConfig(
    enabled=True,
    redis_url=REDIS_URL,  # dedicated Redis DB for RPC
    rpc_timeout=10,
    request_stream=f"{PREFIX}stream:requests",
    consumer_group=f"{PREFIX}rpc_group",
    response_key_prefix=f"{PREFIX}list:response:",
    enable_bridge=True,
    bridge_stream=f"{PREFIX}stream:django:requests",
    bridge_consumer_name=f"{PREFIX}django_bridge",
    broadcast_channel=f"{PREFIX}notifications:broadcast",
    websocket_url=os.environ.get("WS_URL", "ws://127.0.0.1:8765"),
    websocket_secret=os.environ.get("WEBSOCKET_SECRET", "dev-only-websocket-secret-change-me"),
).to_django_settings()["WEBSOCKET_RPC"]

# --- django-dramatiq ------------------------------------------------------------------------------
DRAMATIQ_BROKER = dramatiq_broker_settings(
    os.environ.get("DRAMATIQ_BROKER_URL", REDIS_URL),
    options={"namespace": f"{PREFIX}dramatiq"}
    if not os.environ.get("DRAMATIQ_BROKER_URL", "").startswith("amqp")
    else {},
)
DRAMATIQ_ENCODER = RPC_ENCODER
DRAMATIQ_AUTODISCOVER_MODULES = ["tasks"]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("DJANGO_LOG_LEVEL", "WARNING")},
}
