"""The idle-device simulator behind ``scripts/simulate_idle_devices.py``."""
