"""EdgeRLHF: reproducible RLHF (SFT -> reward models at bf16/int8/int4 -> PPO -> evaluation) on one 8 GB GPU."""

__version__ = "0.1.0"
