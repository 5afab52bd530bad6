"""FLEX-MoE as a plain library: model, fitness, allocation, aggregation, data, metrics.

Nothing in this package imports the Flower framework; ``server_app`` and ``client_app``
wire it into Flower messages.
"""

__version__ = "0.1.0"
