"""Looking at results: run summaries, tables, dictionary geometry and plots."""
