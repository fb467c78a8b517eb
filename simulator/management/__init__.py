"""Management commands of the simulator."""
