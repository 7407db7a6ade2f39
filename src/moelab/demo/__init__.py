"""`moelab demo`: the whole pipeline on the built-in default, cached and resumable."""

from moelab.demo.pipeline import DemoConfig, run_demo

__all__ = ["DemoConfig", "run_demo"]
