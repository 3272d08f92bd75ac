"""The embedded offline default: the tiny SD2-layout base (``tiny_sd2`` and ``assets/``), the procedural
``pokemon-style`` dataset, the style score and the sample grids.
"""
