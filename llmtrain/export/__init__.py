"""Checkpoint consolidation and export to other tools' formats."""
