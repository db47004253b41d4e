"""GRACE's replica routing (TAR / WRR) inside PyTorch serving engines.

``grace.engines.routing.TableRouter`` holds a plan's pick sequences and physical-slot tables as device tensors and
turns logical expert ids into physical slot ids with a few torch ops (no host synchronization), choosing exactly
the replicas ``grace.ReplicaRouter`` chooses. ``grace.engines.sglang`` and ``grace.engines.vllm`` install it into
the engine's logical -> physical step (docs/deploy.md, "Routing hook"). Needs PyTorch; the engines themselves are
imported only by ``install``.
"""
