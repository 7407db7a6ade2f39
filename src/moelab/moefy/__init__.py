"""MoEfication and sparse upcycling: turn a local dense SwiGLU LM (Llama family) into an MoE."""
