"""moelab: Mixture-of-Experts layers, models, routing traces, analyses, predictors and offloading."""

__version__ = "0.1.0"
