"""Shared test setup. The symbolic-core tests' helpers and independent oracles live in core_oracles.py."""
import os
import sys

# `import core_oracles` works under any pytest import mode and from any working directory
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
