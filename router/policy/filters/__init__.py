"""Filters of the routing pipeline: each drops instances a request must not go to."""
