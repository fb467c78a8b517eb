"""Management commands of the provider gateway."""
