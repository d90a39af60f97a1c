"""Flax modules of E2Former-V2, one topic per file."""
