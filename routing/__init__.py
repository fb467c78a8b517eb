"""Routing by complexity: which model answers a turn, chosen by the assistant's (or alias's) routes."""
