"""Reference points for fedlora's benchmarks that are not fedlora.

:mod:`experiments.baselines.plain_flower` is a small plain Flower app written the way Flower's own
Opacus and PEFT examples are (model rebuilt and a fresh Opacus ``PrivacyEngine`` every round, the
whole adapter state exchanged, Flower's ``FedAvg``); :mod:`experiments.baselines.metering` runs it
and ``fedlora simulate`` the same way and measures both from their messages
(``experiments/baseline.py``, ``experiments/scaling.py``). :mod:`experiments.baselines.plain_deploy_app`
bundles the same app for real SuperNodes, with a timed ServerApp grid (``experiments/baseline_deploy.py``).
"""
