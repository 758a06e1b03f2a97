"""Codecs: the TACTIC codec (codec.py), the bmshj2018 scale hyperprior with its framed streams
(hyperprior.py), JPEG (jpeg.py). The learned ones import CompressAI, slow to load: not imported here."""
