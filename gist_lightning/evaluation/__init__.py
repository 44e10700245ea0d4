"""Metrics and callbacks: ROUGE-L / exact match, compression statistics, predictions, summaries."""
