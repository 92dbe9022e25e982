"""Tools around the toolkit: synthetic data sets in the real formats, the CPU demo."""
