"""Model backends. Each is chosen by an explicit `kind` in config and imported lazily."""
