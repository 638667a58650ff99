"""Interoperability with other implementations of Engram: key-name and layout mappings (pure functions)."""
