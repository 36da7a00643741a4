"""Abliteration: the refusal direction, the weights with it projected out, and the direction path.

`abliterate` finds the direction from activations and scores candidates (through the model's
residual-stream hook); `orthogonalize` writes the abliterated weights; `direction_path` samples
the original with (1 - alpha) of the direction projected out of its residual stream.
"""
