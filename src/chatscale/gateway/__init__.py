"""The fleet gateway: one OpenAI-compatible endpoint in front of replicas in several regions.

routing.py and admission.py are pure (no I/O, time passed in) so the simulator runs them too.
"""
