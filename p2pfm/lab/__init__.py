"""Many nodes at once: the simulator, local scenarios and their reports."""
