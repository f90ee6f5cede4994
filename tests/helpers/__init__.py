"""Helpers shared by the test suites: CLI cases in child processes, tiny training runs, GeoJSON checks."""
