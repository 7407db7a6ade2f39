"""Offloaded MoE inference: expert store (slow tier), expert cache + policies, predictor-driven
prefetch, replay simulator and live offloaded generation (Eliseev & Mazur 2023, arXiv:2312.17238)."""

from moelab.offload.cache import POLICIES, CacheCounters, ExpertCache, parse_capacity
from moelab.offload.live import OffloadedModel, PhaseStats, generate_offloaded
from moelab.offload.prefetch import (
    AdaptiveLookahead,
    Combined,
    GateLookahead,
    Prefetcher,
    PreviousToken,
    RecordedRouting,
    TracePredictorLive,
    make_live_predictor,
)
from moelab.offload.simulate import PRESETS, Hardware, SimResult, simulate, simulate_trace
from moelab.offload.store import ExpertStore

__all__ = [
    "POLICIES",
    "PRESETS",
    "AdaptiveLookahead",
    "CacheCounters",
    "Combined",
    "ExpertCache",
    "ExpertStore",
    "GateLookahead",
    "RecordedRouting",
    "Hardware",
    "OffloadedModel",
    "PhaseStats",
    "Prefetcher",
    "PreviousToken",
    "SimResult",
    "TracePredictorLive",
    "generate_offloaded",
    "make_live_predictor",
    "parse_capacity",
    "simulate",
    "simulate_trace",
]
