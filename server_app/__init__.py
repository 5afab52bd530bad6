"""Flower ServerApp of FLEX-MoE: a thin adapter over ``flexmoe_core``."""
