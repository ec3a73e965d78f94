"""Settings: the run's configuration (jsonargparse dataclasses that validate themselves), the data-set and
prompt-format settings, the names an evaluation reports, where shipped files are found, strict JSON and the silencing
of known library noise.

The lowest room: it imports nothing else of dsunlearn's (pyproject.toml's import-linter contract says so).
"""
