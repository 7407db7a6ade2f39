"""What experts are and what they are worth: similarity, grammatical roles, ablation, pruning,
merging and distillation to dense (guide: docs/guide/10-experts.md)."""
