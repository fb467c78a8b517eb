"""Tools app."""
