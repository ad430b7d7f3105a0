"""Regenerating the paper's tables: registry and published numbers (tables.py, paper_tables/), the Rel. Avg.
aggregation (relavg.py, aggregate.py). Nothing here imports vlmeval or torch."""
