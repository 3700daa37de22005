"""Explanation methods (SoftCAM and post-hoc baselines) and the metrics that score them."""
