"""Runs: many prompts' draws through the engine, judged, journaled and stored.

`scheduler` keeps every prompt's adaptive search in flight, judges finished rows in a pool beside
the decode loop and stops on a failing judge; `journal` makes a killed run resume without losing
or duplicating rollouts; `pipeline` defines the main job's draws; `store` is the run directory
(manifest, chunks, atomic writes); `bank` and `data` read rollout banks and prompt files.
"""
