"""Routing analyses over traces (usage, transitions, co-activation, repeat, trajectories,
specialisation, predictability, saturation, projections), each with chance and shuffle baselines."""
