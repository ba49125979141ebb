"""Independent test references (naive token-by-token implementations) and their helpers.

Nothing in this package calls megatron_lcot's latent schedules, attention, masking, rotary or
halting code; see naive_lm.py.
"""
