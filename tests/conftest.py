"""Shared test setup: the import path of the helper modules, and Hypothesis's profiles.

The helpers (core_oracles.py, error_bounds.py, kernel_cases.py, ...) sit next to the tests.
"""
import os
import sys

from hypothesis import HealthCheck, settings

# `import core_oracles` works under any pytest import mode and from any working directory
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Fixtures every test may ask for by name: `splitting_pays` (a multi-threaded program whatever
# this host measures).
pytest_plugins = ["thread_choice"]

# "ci", the default: every run draws the same examples (seeded from each test's source, no
# example database), so a red run is a regression anyone can reproduce, on any Python.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
# "explore": fresh examples every run, to look for new failures; each one found becomes an
# explicit regression case (see README, "Tests").
settings.register_profile("explore", derandomize=False, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
