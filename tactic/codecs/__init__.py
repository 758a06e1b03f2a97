"""Codecs: the TACTIC codec (codec.py), the bmshj2018 scale hyperprior with its framed streams
(hyperprior.py), JPEG (jpeg.py); CompressAI's entropy models with per-image coding that does not
re-send the whole CDF table (entropy.py). The learned ones import CompressAI, slow to load: not
imported here."""
