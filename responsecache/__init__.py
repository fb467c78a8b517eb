"""The response cache: a repeated question answered from a stored answer, with no model call."""
