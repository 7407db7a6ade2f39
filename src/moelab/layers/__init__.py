"""MoE layer library: routers, expert banks, dispatch, MoE blocks, balancing losses, classic mixtures."""
