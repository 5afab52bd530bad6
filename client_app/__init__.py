"""Flower ClientApp of FLEX-MoE: a thin adapter over ``flexmoe_core``."""
