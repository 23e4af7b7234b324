"""Pickers of the routing pipeline: each chooses one instance from the scored candidates."""
