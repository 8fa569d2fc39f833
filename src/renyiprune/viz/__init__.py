"""Attention inspection, figures and the HTML report."""
