"""The lab: small known stochastic processes with an exact teacher and exact kappa.

(Being written; see the module list once it lands.)
"""
