"""Control: steering and circuit modulation built on ``emokernels.patch``. Import-light on
purpose: import the submodule you need, e.g. ``from emokernels.control.steering import Steering``.
"""
