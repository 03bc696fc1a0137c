"""The app's Redis client, created in init_app (never at import)."""

from __future__ import annotations

import redis
from flask import Flask, current_app

EXTENSION_KEY = "patron.redis"


def make_redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)


def init_app(app: Flask, url: str) -> None:
    app.extensions[EXTENSION_KEY] = make_redis(url)


def get_redis(app: Flask | None = None) -> redis.Redis:
    client: redis.Redis = (app or current_app).extensions[EXTENSION_KEY]
    return client
