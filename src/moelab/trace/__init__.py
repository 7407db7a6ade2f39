"""Tracing: hooks that record router decisions of any MoE model into a columnar TraceStore."""
