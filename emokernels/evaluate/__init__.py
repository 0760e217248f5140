"""Evaluation: component validation (ablation / enhancement), and — from other modules —
prompting vs steering vs circuit comparisons. Import-light on purpose: import the submodule you
need, e.g. ``from emokernels.evaluate.validation import validate_components``.
"""
