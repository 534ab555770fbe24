"""Hidden Markov model, trained by Baum-Welch (exact EM)."""
from lightning_modules.hmm.model import HMM

__all__ = ["HMM"]
