"""Figures shared by `bganalysis plot`, report.md and the explorer, in one style."""
