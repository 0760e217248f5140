"""Discovery stages: capture → directions → consistency (and, from other modules, components,
influence, circuits). Import-light on purpose: import the submodule you need, e.g.
``from emokernels.discover.directions import EmotionDirections``.
"""
