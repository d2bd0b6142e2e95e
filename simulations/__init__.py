"""Scenario files and the runner behind ``fedlora simulate``."""
