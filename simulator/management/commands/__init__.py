"""`run_simulator`: the simulator over HTTP."""
