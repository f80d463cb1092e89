"""Data files the package ships (measured figures the CLI prints)."""
