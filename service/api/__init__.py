"""HTTP blueprints; each module exposes `blp` and is registered by the app factory."""
