"""The virtual studio: a synthetic person, a calibration board and a CPU ray-cast renderer."""
