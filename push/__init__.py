"""Push wake-ups for devices that have no live connection."""
