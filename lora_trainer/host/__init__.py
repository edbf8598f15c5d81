"""Adapters for models as a host application (the WebUI) holds them, changed only for the length of a run."""
