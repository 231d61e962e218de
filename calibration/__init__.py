"""Representative frames -> INT8: reservoir, calibration sets, QDQ export, engine builds, the gate.

Deployment calls one function, `calibration.deploy.deploy_model`; docs/int8.md describes the
whole path, the measurements behind its defaults, and what has not yet run on a GPU.
Imports point agent -> calibration -> engines: nothing here imports `agent`.
"""
