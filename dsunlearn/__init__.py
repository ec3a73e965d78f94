"""dsunlearn: large language model unlearning on DeepSpeed ZeRO-3 with fused output-head losses."""

__version__ = "0.1.0"
