"""Moderation app."""
