"""One controllability sweep for every method (`sweep`) and its measures (`measures`).

A trained run is steered through the deployment half of the Method protocol
(`methods.base`): its control space gives the settings, `deploy` the network for each, the one
evaluation loop (`metrics.accumulate`) its test metrics and losses, and `measures` the sweep's
per-task metrics, Delta_m, hypervolume, uniformity, rank controllability and cost. Nothing here
names a method.
"""
