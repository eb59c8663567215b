"""Data: training objects, the on-the-fly stream, specimens, simulated scans and file readers."""
